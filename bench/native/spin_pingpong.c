/* capbus peers benchmark anchor: spinning cache-line ping-pong (the machine's floor).
 *
 * Each direction uses one cache line holding a sequence number and the
 * 48-byte message.  The parent writes the request and bumps its sequence; the
 * child spins on that line, copies the message into its own line and bumps
 * its sequence; the parent spins until it sees it.  No syscalls: a round trip
 * is two cache-line transfers between the CPUs.  Only meaningful with the two
 * processes on different CPUs.
 *
 * usage: spin_pingpong MAX_ITERS DURATION_MS WARMUP CPU_PARENT CPU_CHILD TIMEOUT_S
 *   Prints: iters= median_ns= p99_ns= min_ns= max_ns= mean_ns=
 */
#include "bench_common.h"

#define STOP UINT64_MAX

struct line {
    _Alignas(CACHE_LINE) uint64_t seq;
    unsigned char msg[MSG_SIZE];
};

struct shared {
    struct line ping;
    struct line pong;
};

static void child_loop(struct shared *sh)
{
    uint64_t last = 0;
    unsigned char buf[MSG_SIZE];
    for (;;) {
        uint64_t v;
        while ((v = __atomic_load_n(&sh->ping.seq, __ATOMIC_ACQUIRE)) == last)
            cpu_relax();
        if (v == STOP)
            break;
        memcpy(buf, sh->ping.msg, MSG_SIZE);
        memcpy(sh->pong.msg, buf, MSG_SIZE);
        __atomic_store_n(&sh->pong.seq, v, __ATOMIC_RELEASE);
        last = v;
    }
}

int main(int argc, char **argv)
{
    long max_iters = arg_long(argc, argv, 1, 2000000);
    long duration_ms = arg_long(argc, argv, 2, 1000);
    long warmup = arg_long(argc, argv, 3, 10000);
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
    memset(msg, 0xcd, sizeof msg);
    size_t n = 0;
    uint64_t total = 0, deadline = 0;
    for (long i = 0; i < warmup + max_iters; i++) {
        if (i == warmup)
            deadline = now_ns() + (uint64_t)duration_ms * 1000000ull;
        uint64_t seq = (uint64_t)i + 1;
        uint64_t t0 = now_ns();
        memcpy(msg, &seq, sizeof seq);
        memcpy(sh->ping.msg, msg, MSG_SIZE);
        __atomic_store_n(&sh->ping.seq, seq, __ATOMIC_RELEASE);
        while (__atomic_load_n(&sh->pong.seq, __ATOMIC_ACQUIRE) != seq)
            cpu_relax();
        memcpy(reply, sh->pong.msg, MSG_SIZE);
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
    __atomic_store_n(&sh->ping.seq, STOP, __ATOMIC_RELEASE);
    int rc = reap(pid);
    if (rc != 0) {
        fprintf(stderr, "error: child exited with %d\n", rc);
        return 2;
    }
    report_latency(samples, n, total);
    return 0;
}
