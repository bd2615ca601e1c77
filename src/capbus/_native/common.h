/*
 * _native/common.h: Part B, the data plane: wait modes and tunables (spin, slices, sleep caps,
 * scans), the adaptive spin's contention estimate, cpu_relax, deadlines, the control-page state
 * and the errors it raises (raise_for_state, raise_corrupt, CorruptChannel, Cancelled).
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_COMMON_H
#define CAPBUS_NATIVE_COMMON_H

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
 * saw its event doubles it (up to spin_ns): spinning for a peer that takes long is waste too.
 *
 * A caller's wait (a lane's) goes further, as glibc's adaptive mutex does: SPIN_STOP_AFTER spins
 * in a row lost at the floor while the server was awake (the loss is the caller's place in a busy
 * server's queue) end spinning altogether, and a wait that then slept learns from its own length
 * whether spinning pays again: a reply that came within spin_ns of the wait's start (a spin would
 * have seen it), or one to a request that had to wake the server, starts again from the floor
 * (lane_setup.c, lane_spin_lost / lane_spin_learn). That is the many-callers case the contention
 * sign above misses: 16 clients of one server on 2 cores sleep on every call (voluntary switches,
 * a few hundred involuntary ones a second each), so the sign never shows, and each of them burned
 * a floor spin per call (64 pauses, 1-3 us: a third of a client's user time per call) on a CPU
 * the server and the woken clients needed, though its replies come ~80 us apart. The server keeps
 * its floor (an idle server's short spin is what catches a lone caller's next request). */
#define CONTENTION_CHECK_NS 10000000ull
#define CONTENTION_HOLD_NS 200000000ull
#define CONTENDED_PER_S 2000u
#define SPIN_FLOOR_NS 1000ull
#define SPIN_STOP_AFTER 4u

/* Spins read the clock every SPIN_CLOCK_EVERY pauses. A pause is 40-140 cycles (by CPU model),
 * so 1024 of them made every spin last 20-50 us whatever spin_cur said (SPIN_FLOOR_NS meant
 * nothing): with 16 adaptive clients on 2 cores those spins took the CPU the server needed
 * (aggregate calls/s fell to a third). 64 pauses are ~1-3 us; a clock read (~25 ns) per 64 is
 * noise. */
#define SPIN_CLOCK_EVERY 64u

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

#define DEADLINE_UNSET (UINT64_MAX - 1) /* see "Lazy deadlines" below */
#define DEADLINE_FAR_NS (2 * SLEEP_CAP_NS)

/* `timeout_ns` after `now` (timeout_ns >= 0): never DEADLINE_UNSET; UINT64_MAX = none. */
static inline uint64_t deadline_from(uint64_t now, int64_t timeout_ns)
{
    if (timeout_ns < 0)
        return UINT64_MAX;
    uint64_t d = now + (uint64_t)timeout_ns;
    return (uint64_t)timeout_ns > UINT64_MAX - now || d >= DEADLINE_UNSET ? UINT64_MAX : d;
}

static inline uint64_t deadline_after(int64_t timeout_ns)
{
    return timeout_ns < 0 ? UINT64_MAX : deadline_from(now_ns(), timeout_ns);
}

/* ---- Lazy deadlines ----------------------------------------------------------------------------
 * A call or a receive with a timeout used to read CLOCK_MONOTONIC up to four times more than one
 * without (~25 ns each on a VM: 10-20% of a spin round trip). Now the deadline is DEADLINE_UNSET
 * until the first wait needs the clock anyway (lane_wait, ss_wait: they read it for their slice),
 * which fixes it to that reading + timeout (a few hundred ns after the call began: a timeout is
 * never early, and late by no more than that). A timeout of 0 is deadline 0: expired at once,
 * no clock. A wait whose deadline is more than DEADLINE_FAR_NS away sleeps as an untimed one does
 * (the eventfd / pipe, under the watchdog's kicks, which end any such sleep within ~2 watchdog
 * ticks, well inside DEADLINE_FAR_NS); only the last stretch before the deadline is a timed
 * futex sleep. So `timeout=10` costs what no timeout costs. */

static inline uint64_t deadline_lazy(int64_t timeout_ns)
{
    return timeout_ns < 0 ? UINT64_MAX : timeout_ns == 0 ? 0 : DEADLINE_UNSET;
}

/* *d fixed at `now` if still unset; returns it. */
static inline uint64_t deadline_fix(uint64_t *d, int64_t timeout_ns, uint64_t now)
{
    if (*d == DEADLINE_UNSET)
        *d = deadline_from(now, timeout_ns);
    return *d;
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
        PyErr_Format(PeerDied, "the %s process died: look the service up again once it is back", who);
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

#endif /* CAPBUS_NATIVE_COMMON_H */
