/*
 * _native/prio.c: Priority propagation (Binder's model): a call carries its caller thread's
 * scheduling priority, and the thread that receives it runs the handler at that priority, then
 * goes back to its own. Per-thread state (TLS), no Python objects: callable with or without the
 * GIL. HOT: prio_stamp runs on every message sent, prio_of on every request received; the
 * syscalls run only when a thread's priority actually changes.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 *
 * A priority is one int (see FLAG_PRIO in layout.h): -nice for the time-sharing policies
 * (PRIO_MIN = nice 19 ... 20 = nice -20), PRIO_RT_BASE + r for SCHED_FIFO/SCHED_RR priority r
 * (up to PRIO_MAX). Higher is more urgent.
 *
 * Caller side. prio_stamp() returns the FLAG_PRIO bits of this thread's priority from a TLS
 * cache: reading it per call (sched_getscheduler + getpriority: two syscalls, ~0.3 us on a VM)
 * would cost more than a spin round trip's budget. The cache is dropped at most PRIO_REFRESH_NS
 * after it was read (prio_tick, fed the coarse clock the send path reads anyway), so a thread
 * that changes its own priority (os.setpriority, os.sched_setscheduler) is seen within ~10 ms,
 * or at once after capbus.refresh_priority().
 *
 * Receiver side. prio_of() clamps the stamped value: to the capability's highest priority (the
 * control page: the kernel's word, CTRL_MAX_PRIORITY_OFF) and to the service's own range
 * (lo, hi): a hostile slot gets at most what its capability and the service allow. prio_adopt()
 * then sets the receiving thread to it, and prio_restore() puts the thread back: at the next
 * receive, and at reply time on the thread that adopted. Nothing raises a thread above what the
 * process may set (RLIMIT_NICE, RLIMIT_RTPRIO, CAP_SYS_NICE): a real-time priority the process
 * may not set becomes the most urgent nice value it may (nice -20 as root, 20 - RLIMIT_NICE
 * otherwise), and a thread adopts nothing at all unless it could go back to its own priority
 * afterwards (an unprivileged thread at nice 0 with RLIMIT_NICE 0 could lower itself to nice 19
 * but never return: it serves every caller at its own priority instead).
 */

#define PRIO_REFRESH_NS 10000000ull /* how stale a thread's cached own priority may be */
#define PRIO_NONE INT16_MIN         /* a request without FLAG_PRIO (a raw client) */

/* Per thread, in two parts. The hot one (read per message) is initial-exec TLS, 16 bytes: the
 * static TLS that a dlopen()ed module may take is small and shared with every other extension.
 * The rest (read when a priority changes) uses the default model. */
typedef struct {
    uint32_t bits;    /* FLAG_PRIO bits of the thread's current priority; 0 = not read yet */
    uint32_t adopted; /* the thread runs at a caller's priority (prio_cold_t.base_* is its own) */
    uint64_t at;      /* coarse_ns() when bits were read */
} prio_hot_t;

typedef struct {
    int mine;             /* the priority in bits */
    int rr;               /* ... and it is SCHED_RR (when mine > PRIO_RT_BASE) */
    int base_policy;      /* the thread's own, while adopted */
    int base_nice;
    struct sched_param base_param;
    uint64_t stuck_until; /* coarse_ns(): it could not go back, so it adopts nothing till then */
} prio_cold_t;

static __thread __attribute__((tls_model("initial-exec"))) prio_hot_t my_prio;
static __thread prio_cold_t my_prio_c;

static inline int prio_clamp(int p, int lo, int hi) { return p < lo ? lo : p > hi ? hi : p; }

static inline uint32_t prio_bits(int p, int rr)
{
    return FLAG_PRIO | (rr && p > PRIO_RT_BASE ? FLAG_PRIO_RR : 0) |
           ((uint32_t)(p + PRIO_SLOT_BIAS) << FLAG_PRIO_SHIFT);
}

/* The calling thread's policy and priority, read now (two or three syscalls). */
static int prio_read(int *policy, int *nice, struct sched_param *param)
{
    *policy = sched_getscheduler(0); /* 0: the calling thread (Linux) */
    if (*policy < 0)
        *policy = SCHED_OTHER;
    param->sched_priority = 0;
    if ((*policy == SCHED_FIFO || *policy == SCHED_RR) && sched_getparam(0, param) != 0)
        param->sched_priority = 0;
    errno = 0;
    int n = getpriority(PRIO_PROCESS, 0); /* who 0: the calling thread (Linux) */
    *nice = errno ? 0 : n;
    if (*policy == SCHED_FIFO || *policy == SCHED_RR)
        return prio_clamp(PRIO_RT_BASE + param->sched_priority, PRIO_RT_BASE + 1, PRIO_MAX);
    if (*policy == SCHED_IDLE)
        return PRIO_MIN;
    return prio_clamp(-*nice, PRIO_MIN, PRIO_RT_BASE);
}

static __attribute__((noinline)) void prio_refresh(void)
{
    int policy, nice;
    struct sched_param param;
    my_prio_c.mine = prio_read(&policy, &nice, &param);
    my_prio_c.rr = policy == SCHED_RR;
    my_prio.bits = prio_bits(my_prio_c.mine, my_prio_c.rr);
    my_prio.at = coarse_ns();
    }

/* FLAG_PRIO bits of this thread's priority (cached; see above). */
static HOT inline uint32_t prio_stamp(void)
{
    if (__builtin_expect(!my_prio.bits, 0))
        prio_refresh();
    return my_prio.bits;
}

/* A message was just sent at coarse time `now`: drop a stale cache (read again at the next
 * stamp). A thread running at an adopted priority keeps it: that is what it should pass on. */
static HOT inline void prio_tick(uint64_t now)
{
    if (__builtin_expect(now - my_prio.at > PRIO_REFRESH_NS, 0) && !my_prio.adopted)
        my_prio.bits = 0;
}

/* The priority a request asks for, clamped (see the head comment), or PRIO_NONE. `ctrl`: the
 * channel's control page (kernel-written). *rr: SCHED_RR rather than SCHED_FIFO. */
static HOT inline int prio_of(uint32_t flags, const char *ctrl, int lo, int hi, int *rr)
{
    if (!(flags & FLAG_PRIO))
        return PRIO_NONE;
    int p = (int)((flags & FLAG_PRIO_MASK) >> FLAG_PRIO_SHIFT) - PRIO_SLOT_BIAS;
    p = prio_clamp(p, lo, hi);
    /* RELAXED: written once by the kernel before the page was handed out. */
    uint32_t cap = __atomic_load_n((const uint32_t *)(ctrl + CTRL_MAX_PRIORITY_OFF), __ATOMIC_RELAXED);
    if (cap) {
        int cmax = prio_clamp((int)(cap > 1000 ? 1000 : cap) - PRIO_CTRL_BIAS, PRIO_MIN, PRIO_MAX);
        if (p > cmax)
            p = cmax;
    }
    *rr = (flags & FLAG_PRIO_RR) != 0;
    return p;
}

/* ---- Setting the thread's priority (only when it changes; see prio_adopt). ------------------ */

/* The most urgent nice value this process may set without CAP_SYS_NICE: 20 - RLIMIT_NICE. */
static int nice_floor(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NICE, &rl) != 0)
        return 19;
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= 40)
        return -20;
    return 20 - (int)rl.rlim_cur;
}

static int has_cap_sys_nice(void)
{
    struct {
        uint32_t version;
        int pid;
    } hdr = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
    struct {
        uint32_t effective, permitted, inheritable;
    } data[2];
    if (syscall(SYS_capget, &hdr, data) != 0)
        return 0;
    return (data[0].effective >> 23) & 1; /* CAP_SYS_NICE */
}

/* Set this thread to priority p (rr: SCHED_RR for a real-time one), as close as the process
 * may; returns the priority it runs at now. `tpolicy`: the time-sharing policy to use for a
 * nice value (the thread's own: SCHED_OTHER or SCHED_BATCH). */
static int prio_set(int p, int rr, int tpolicy)
{
    if (p > PRIO_RT_BASE) {
        struct sched_param sp = {.sched_priority = p - PRIO_RT_BASE};
        if (sched_setscheduler(0, rr ? SCHED_RR : SCHED_FIFO, &sp) == 0)
            return p;
        p = PRIO_RT_BASE; /* not permitted: the most urgent nice value instead */
    }
    int policy = sched_getscheduler(0);
    if (policy != tpolicy) {
        struct sched_param z = {.sched_priority = 0};
        if (sched_setscheduler(0, tpolicy, &z) != 0 && policy != SCHED_OTHER &&
            policy != SCHED_BATCH)
            return my_prio_c.mine; /* cannot leave a real-time policy: unchanged */
    }
    int nice = -p;
    if (setpriority(PRIO_PROCESS, 0, nice) != 0) {
        int fl = nice_floor();
        if (nice >= fl || setpriority(PRIO_PROCESS, 0, fl) != 0)
            return my_prio_c.mine;
        nice = fl;
    }
    return -nice;
}

/* Could this thread go back to its own priority after adopting another? */
static int prio_restorable(int policy, int nice)
{
    if (policy == SCHED_OTHER || policy == SCHED_BATCH) {
        if (nice >= nice_floor())
            return 1;
    }
    return has_cap_sys_nice();
}

/* Back to the thread's own priority (as it was when it adopted one). */
static __attribute__((noinline)) void prio_restore_slow(void)
{
    int policy = my_prio_c.base_policy;
    my_prio.adopted = 0;
    if (sched_getscheduler(0) != policy || policy == SCHED_FIFO || policy == SCHED_RR)
        sched_setscheduler(0, policy, &my_prio_c.base_param);
    if (policy != SCHED_FIFO && policy != SCHED_RR)
        setpriority(PRIO_PROCESS, 0, my_prio_c.base_nice);
    prio_refresh(); /* what it runs at now, whatever failed above */
}

static HOT inline void prio_restore(void)
{
    if (__builtin_expect(my_prio.adopted, 0))
        prio_restore_slow();
}

/* Run this thread at priority p (from prio_of; PRIO_NONE: at its own). */
static void prio_adopt(int p, int rr)
{
    if (p == PRIO_NONE) {
        if (my_prio.adopted)
            prio_restore_slow();
        return;
    }
    if (!my_prio.bits)
        prio_refresh();
    if (p == my_prio_c.mine && (p <= PRIO_RT_BASE || rr == my_prio_c.rr))
        return;
    if (!my_prio.adopted) {
        /* A thread that may not go back is asked again once a second, not per call (the
         * checks are four syscalls). */
        uint64_t now = coarse_ns();
        if (now < my_prio_c.stuck_until)
            return;
        struct sched_param param;
        int policy, nice;
        prio_read(&policy, &nice, &param);
        if (!prio_restorable(policy, nice)) {
            my_prio_c.stuck_until = now + 1000000000ull;
            return;
        }
        my_prio_c.base_policy = policy;
        my_prio_c.base_nice = nice;
        my_prio_c.base_param = param;
        my_prio.adopted = 1;
    }
    int tpolicy = my_prio_c.base_policy == SCHED_BATCH ? SCHED_BATCH : SCHED_OTHER;
    my_prio_c.mine = prio_set(p, rr, tpolicy);
    my_prio_c.rr = rr && my_prio_c.mine > PRIO_RT_BASE;
    my_prio.bits = prio_bits(my_prio_c.mine, my_prio_c.rr); /* nested calls pass it on */
    }

/* ---- Module functions. ----------------------------------------------------------------------- */

static PyObject *py_thread_priority(PyObject *self, PyObject *unused)
{
    int policy, nice;
    struct sched_param param;
    return PyLong_FromLong(prio_read(&policy, &nice, &param));
}

static PyObject *py_refresh_priority(PyObject *self, PyObject *unused)
{
    if (!my_prio.adopted)
        my_prio.bits = 0;
    Py_RETURN_NONE;
}

static PyObject *py_restore_priority(PyObject *self, PyObject *unused)
{
    prio_restore();
    Py_RETURN_NONE;
}
