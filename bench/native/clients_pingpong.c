/* capbus clients benchmark anchor: N client processes calling one server process.
 *
 * The native reference for `python -m bench --only clients`: the same shape (one server, N
 * clients, each client making synchronous round trips flat out for a fixed window, unpinned),
 * with the best wait C can do for it. Each client owns one cache-line-aligned slot: it writes a
 * 48-byte request, bumps its request sequence and waits for the reply sequence to match; the
 * server scans every slot, copies each pending request into its reply and bumps the reply
 * sequence. Waits, both ends:
 *   SPIN_NS < 0   pure spin (no syscalls at all; only sensible while processes <= CPUs);
 *   SPIN_NS >= 0  spin for SPIN_NS, then FUTEX_WAIT (a client on its reply sequence, the server
 *                 on a doorbell word), with the usual Dekker pair "store my sleeping flag; full
 *                 fence; re-check" against "publish; full fence; read the peer's flag, wake it
 *                 if set", so a wake-up is paid only when the peer really went to sleep.
 * So once processes outnumber CPUs, what remains is the machine's cost of a context switch per
 * call, which is what this measures against capbus's own figure.
 *
 * usage: clients_pingpong NCLIENTS DURATION_MS SPIN_NS TIMEOUT_S
 *   Prints: clients= calls= per_s= min_per_s= max_per_s= csw_per_call=
 *   (csw_per_call: voluntary + involuntary context switches of every process, per round trip)
 */
#include "bench_common.h"

#include <linux/futex.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define MAX_CLIENTS 64

struct slot {
    _Alignas(CACHE_LINE) uint32_t req;  /* client: sequence of its last request */
    uint32_t sleeping;                  /* client: 1 while it is (about to be) in FUTEX_WAIT */
    unsigned char msg[MSG_SIZE];
    _Alignas(CACHE_LINE) uint32_t rep;  /* server: sequence of the last reply (the futex word) */
    unsigned char out[MSG_SIZE];
};

struct shared {
    _Alignas(CACHE_LINE) uint32_t bell;       /* bumped by a client that wakes the server */
    uint32_t server_sleeping;
    _Alignas(CACHE_LINE) uint32_t ready;      /* clients connected */
    uint32_t go;                              /* 1: start calling; futex word */
    uint32_t stop;                            /* 1: the server exits */
    _Alignas(CACHE_LINE) uint64_t counts[MAX_CLIENTS];
    struct slot slots[MAX_CLIENTS];
};

static long futex(uint32_t *addr, int op, uint32_t val)
{
    return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

static void futex_wait(uint32_t *addr, uint32_t val)
{
    if (futex(addr, FUTEX_WAIT, val) != 0 && errno != EAGAIN && errno != EINTR)
        die("FUTEX_WAIT");
}

/* Spin until *word != val for at most spin_ns (< 0: forever). 1 if it changed. */
static int spin_while(const uint32_t *word, uint32_t val, long spin_ns)
{
    if (spin_ns == 0)
        return __atomic_load_n(word, __ATOMIC_ACQUIRE) != val;
    uint64_t end = spin_ns > 0 ? now_ns() + (uint64_t)spin_ns : UINT64_MAX;
    for (unsigned i = 1;; i++) {
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != val)
            return 1;
        cpu_relax();
        if (i % 64 == 0 && now_ns() >= end) /* the clock every 64 pauses, as capbus does */
            return 0;
    }
}

/* One pass over every slot: answer each pending request. Returns how many. */
static int serve_pass(struct shared *sh, int n)
{
    int done = 0;
    for (int i = 0; i < n; i++) {
        struct slot *s = &sh->slots[i];
        uint32_t q = __atomic_load_n(&s->req, __ATOMIC_ACQUIRE);
        if (q == __atomic_load_n(&s->rep, __ATOMIC_RELAXED))
            continue;
        memcpy(s->out, s->msg, MSG_SIZE);
        __atomic_store_n(&s->rep, q, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* Dekker with the client's sleeping flag */
        if (__atomic_load_n(&s->sleeping, __ATOMIC_RELAXED))
            futex(&s->rep, FUTEX_WAKE, 1);
        done++;
    }
    return done;
}

static void server_loop(struct shared *sh, int n, long spin_ns)
{
    while (!__atomic_load_n(&sh->stop, __ATOMIC_ACQUIRE)) {
        if (serve_pass(sh, n))
            continue;
        /* Nothing pending: spin (re-scanning) for the budget, then sleep on the bell. */
        uint64_t end = spin_ns > 0 ? now_ns() + (uint64_t)spin_ns : UINT64_MAX;
        int got = 0;
        for (unsigned i = 1; spin_ns != 0 && !__atomic_load_n(&sh->stop, __ATOMIC_RELAXED); i++) {
            if ((got = serve_pass(sh, n)))
                break;
            cpu_relax();
            if (i % 64 == 0 && now_ns() >= end)
                break;
        }
        if (got || spin_ns < 0)
            continue;
        uint32_t b = __atomic_load_n(&sh->bell, __ATOMIC_ACQUIRE);
        __atomic_store_n(&sh->server_sleeping, 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (!serve_pass(sh, n) && !__atomic_load_n(&sh->stop, __ATOMIC_RELAXED))
            futex_wait(&sh->bell, b);
        __atomic_store_n(&sh->server_sleeping, 0, __ATOMIC_RELAXED);
    }
}

static void client_loop(struct shared *sh, int me, long duration_ms, long spin_ns)
{
    struct slot *s = &sh->slots[me];
    unsigned char msg[MSG_SIZE];
    memset(msg, me, sizeof msg);
    __atomic_fetch_add(&sh->ready, 1, __ATOMIC_ACQ_REL);
    while (!__atomic_load_n(&sh->go, __ATOMIC_ACQUIRE))
        futex_wait(&sh->go, 0);
    uint64_t end = now_ns() + (uint64_t)duration_ms * 1000000ull, calls = 0;
    uint32_t seq = 0;
    for (;;) {
        for (int k = 0; k < 100; k++) { /* the clock every 100 calls, as the Python clients */
            seq++;
            memcpy(msg, &seq, sizeof seq);
            memcpy(s->msg, msg, MSG_SIZE);
            __atomic_store_n(&s->req, seq, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST); /* Dekker with server_sleeping */
            if (spin_ns >= 0 && __atomic_load_n(&sh->server_sleeping, __ATOMIC_RELAXED)) {
                __atomic_fetch_add(&sh->bell, 1, __ATOMIC_RELEASE);
                futex(&sh->bell, FUTEX_WAKE, 1);
            }
            if (!spin_while(&s->rep, seq - 1, spin_ns)) {
                for (;;) {
                    __atomic_store_n(&s->sleeping, 1, __ATOMIC_RELAXED);
                    __atomic_thread_fence(__ATOMIC_SEQ_CST);
                    if (__atomic_load_n(&s->rep, __ATOMIC_ACQUIRE) != seq - 1)
                        break;
                    futex_wait(&s->rep, seq - 1);
                }
                __atomic_store_n(&s->sleeping, 0, __ATOMIC_RELAXED);
            }
            if (__atomic_load_n(&s->rep, __ATOMIC_ACQUIRE) != seq || memcmp(s->out, msg, MSG_SIZE)) {
                fprintf(stderr, "error: client %d: wrong reply at %u\n", me, seq);
                _exit(2);
            }
        }
        calls += 100;
        if (now_ns() >= end)
            break;
    }
    sh->counts[me] = calls;
}

int main(int argc, char **argv)
{
    int n = (int)arg_long(argc, argv, 1, 1);
    long duration_ms = arg_long(argc, argv, 2, 1000);
    long spin_ns = arg_long(argc, argv, 3, 50000);
    long timeout_s = arg_long(argc, argv, 4, 60);
    if (n < 1 || n > MAX_CLIENTS) {
        fprintf(stderr, "error: NCLIENTS must be 1..%d\n", MAX_CLIENTS);
        return 2;
    }
    alarm((unsigned)timeout_s);
    struct shared *sh = shared_map(sizeof(struct shared));

    pid_t server = fork_child();
    if (server == 0) {
        alarm((unsigned)timeout_s);
        server_loop(sh, n, spin_ns);
        _exit(0);
    }
    pid_t clients[MAX_CLIENTS];
    for (int i = 0; i < n; i++) {
        clients[i] = fork_child();
        if (clients[i] == 0) {
            alarm((unsigned)timeout_s);
            client_loop(sh, i, duration_ms, spin_ns);
            _exit(0);
        }
    }
    while (__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) < (uint32_t)n)
        usleep(1000);
    usleep(100000); /* the forks' last CPU settles, as the Python bench's pause */
    __atomic_store_n(&sh->go, 1, __ATOMIC_RELEASE);
    futex(&sh->go, FUTEX_WAKE, INT32_MAX);
    int bad = 0;
    for (int i = 0; i < n; i++)
        bad |= reap(clients[i]) != 0;
    __atomic_store_n(&sh->stop, 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&sh->bell, 1, __ATOMIC_RELEASE);
    futex(&sh->bell, FUTEX_WAKE, 1);
    bad |= reap(server) != 0;
    if (bad) {
        fprintf(stderr, "error: a client or the server failed\n");
        return 2;
    }
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    uint64_t total = 0, lo = UINT64_MAX, hi = 0;
    for (int i = 0; i < n; i++) {
        total += sh->counts[i];
        lo = sh->counts[i] < lo ? sh->counts[i] : lo;
        hi = sh->counts[i] > hi ? sh->counts[i] : hi;
    }
    double secs = (double)duration_ms / 1000.0;
    printf("clients=%d calls=%llu per_s=%.0f min_per_s=%.0f max_per_s=%.0f csw_per_call=%.3f\n", n,
           (unsigned long long)total, (double)total / secs, (double)lo / secs, (double)hi / secs,
           total ? (double)(ru.ru_nvcsw + ru.ru_nivcsw) / (double)total : 0.0);
    return 0;
}
