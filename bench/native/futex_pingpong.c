/* capbus peers benchmark anchor: futex ping-pong between two processes.
 *
 * The parent writes a 48-byte request into shared memory, flips a shared
 * 32-bit word to 1 and FUTEX_WAKEs the child; the child (blocked in
 * FUTEX_WAIT) copies the request into the reply slot, flips the word back to
 * 0 and wakes the parent.  There is no spinning before sleeping, so every
 * round trip costs two wake-ups through the kernel.  The parent times each
 * round trip with CLOCK_MONOTONIC.
 *
 * usage: futex_pingpong MAX_ITERS DURATION_MS WARMUP CPU_PARENT CPU_CHILD TIMEOUT_S
 *   (CPU_* < 0: no pinning).  Prints: iters= median_ns= p99_ns= min_ns= max_ns= mean_ns=
 */
#include "bench_common.h"

#include <linux/futex.h>
#include <sys/syscall.h>

struct shared {
    _Alignas(CACHE_LINE) uint32_t word; /* 0: child's turn done, 1: request posted, 2: stop */
    _Alignas(CACHE_LINE) unsigned char req[MSG_SIZE];
    _Alignas(CACHE_LINE) unsigned char rep[MSG_SIZE];
};

static long futex(uint32_t *addr, int op, uint32_t val)
{
    return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

static void wait_while(uint32_t *word, uint32_t val)
{
    while (__atomic_load_n(word, __ATOMIC_ACQUIRE) == val) {
        if (futex(word, FUTEX_WAIT, val) != 0 && errno != EAGAIN && errno != EINTR)
            die("FUTEX_WAIT");
    }
}

static void child_loop(struct shared *sh)
{
    unsigned char buf[MSG_SIZE];
    for (;;) {
        uint32_t v;
        while ((v = __atomic_load_n(&sh->word, __ATOMIC_ACQUIRE)) == 0) {
            if (futex(&sh->word, FUTEX_WAIT, 0) != 0 && errno != EAGAIN && errno != EINTR)
                die("FUTEX_WAIT");
        }
        if (v == 2)
            break;
        memcpy(buf, sh->req, MSG_SIZE);
        memcpy(sh->rep, buf, MSG_SIZE);
        __atomic_store_n(&sh->word, 0, __ATOMIC_RELEASE);
        futex(&sh->word, FUTEX_WAKE, 1);
    }
}

int main(int argc, char **argv)
{
    long max_iters = arg_long(argc, argv, 1, 200000);
    long duration_ms = arg_long(argc, argv, 2, 1500);
    long warmup = arg_long(argc, argv, 3, 1000);
    int cpu_parent = (int)arg_long(argc, argv, 4, -1);
    int cpu_child = (int)arg_long(argc, argv, 5, -1);
    long timeout_s = arg_long(argc, argv, 6, 60);
    if (max_iters < 1)
        max_iters = 1;

    alarm((unsigned)timeout_s);
    struct shared *sh = shared_map(sizeof(struct shared));
    uint64_t *samples = malloc((size_t)max_iters * sizeof(uint64_t));
    if (!samples)
        die("malloc");

    pid_t pid = fork_child();
    if (pid == 0) {
        alarm((unsigned)timeout_s);
        pin_to(cpu_child);
        child_loop(sh);
        _exit(0);
    }
    pin_to(cpu_parent);

    unsigned char msg[MSG_SIZE], reply[MSG_SIZE];
    memset(msg, 0xab, sizeof msg);
    size_t n = 0;
    uint64_t total = 0, deadline = 0;
    for (long i = 0; i < warmup + max_iters; i++) {
        if (i == warmup)
            deadline = now_ns() + (uint64_t)duration_ms * 1000000ull;
        uint64_t t0 = now_ns();
        memcpy(msg, &i, sizeof i);
        memcpy(sh->req, msg, MSG_SIZE);
        __atomic_store_n(&sh->word, 1, __ATOMIC_RELEASE);
        futex(&sh->word, FUTEX_WAKE, 1);
        wait_while(&sh->word, 1);
        memcpy(reply, sh->rep, MSG_SIZE);
        uint64_t t1 = now_ns();
        if (memcmp(reply, msg, MSG_SIZE) != 0) {
            fprintf(stderr, "error: reply mismatch at %ld\n", i);
            return 2;
        }
        if (i >= warmup) {
            samples[n++] = t1 - t0;
            total += t1 - t0;
            if (t1 >= deadline)
                break;
        }
    }
    __atomic_store_n(&sh->word, 2, __ATOMIC_RELEASE);
    futex(&sh->word, FUTEX_WAKE, 1);
    int rc = reap(pid);
    if (rc != 0) {
        fprintf(stderr, "error: child exited with %d\n", rc);
        return 2;
    }
    report_latency(samples, n, total);
    return 0;
}
