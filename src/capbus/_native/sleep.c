/*
 * _native/sleep.c: Eventfds (event-loop waiters), sleep eventfds and reply-sleep pipes, kicks, and
 * the sleep watchdog (which walks ServerSets, so it comes after serverset.h). Process-wide
 * machinery: the kick signal handler and the watchdog thread run without the GIL.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

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
