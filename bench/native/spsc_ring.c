/* capbus peers benchmark anchor: single-producer single-consumer ring in shared memory.
 *
 * The child produces 48-byte messages (sequence number in the first 8 bytes)
 * into a 1024-slot ring of 64-byte slots; the parent consumes and checks them.
 * head (consumer) and tail (producer) live on separate cache lines and each
 * side caches the other's index, re-reading it only when the ring looks full
 * (producer) or empty (consumer).
 *
 *   BATCH == 1 (unbatched): every message is published (tail store) and
 *                           consumed (head store) individually.
 *   BATCH  > 1 (batched):   the producer publishes tail once per BATCH
 *                           messages, the consumer publishes head once per
 *                           BATCH messages (or when it has drained the ring).
 *
 * The consumer times from the first message after WARMUP to the last one.
 * After DURATION_MS it raises a stop flag; the producer notices within 1024
 * messages, publishes its final count and the consumer drains the rest.
 *
 * MAX_MSGS counts the measured messages (after WARMUP); 0 means "until DURATION_MS".
 *
 * usage: spsc_ring MAX_MSGS DURATION_MS WARMUP BATCH CPU_PARENT CPU_CHILD TIMEOUT_S
 *   Prints: msgs= elapsed_ns= msgs_per_s=
 */
#include "bench_common.h"

#define CAP 1024u
#define MASK (CAP - 1u)

struct slot {
    _Alignas(CACHE_LINE) unsigned char data[MSG_SIZE];
};

struct ring {
    _Alignas(CACHE_LINE) uint64_t head;
    _Alignas(CACHE_LINE) uint64_t tail;
    _Alignas(CACHE_LINE) uint64_t stop;
    _Alignas(CACHE_LINE) uint64_t done;  /* producer finished ...        */
    uint64_t total;                      /* ... after producing total     */
    struct slot slots[CAP];
};

static void produce(struct ring *r, uint64_t max_msgs, uint64_t batch)
{
    unsigned char msg[MSG_SIZE];
    memset(msg, 0x5a, sizeof msg);
    uint64_t tail = 0, head_cache = 0, published = 0;
    for (;;) {
        if ((tail & 1023u) == 0 && __atomic_load_n(&r->stop, __ATOMIC_RELAXED))
            break;
        if (tail >= max_msgs)
            break;
        while (tail - head_cache >= CAP) {
            head_cache = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
            if (tail - head_cache >= CAP) {
                if (published != tail) {
                    __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
                    published = tail;
                }
                cpu_relax();
            }
        }
        memcpy(msg, &tail, sizeof tail);
        memcpy(r->slots[tail & MASK].data, msg, MSG_SIZE);
        tail++;
        if (tail - published >= batch) {
            __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
            published = tail;
        }
    }
    __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
    r->total = tail;
    __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
}

int main(int argc, char **argv)
{
    long max_msgs = arg_long(argc, argv, 1, 1L << 40);
    long duration_ms = arg_long(argc, argv, 2, 1000);
    long warmup = arg_long(argc, argv, 3, 100000);
    long batch = arg_long(argc, argv, 4, 1);
    int cpu_parent = (int)arg_long(argc, argv, 5, -1);
    int cpu_child = (int)arg_long(argc, argv, 6, -1);
    long timeout_s = arg_long(argc, argv, 7, 60);
    if (batch < 1)
        batch = 1;
    if (warmup < 0)
        warmup = 0;
    if (max_msgs <= 0)
        max_msgs = 1L << 62; /* 0: bounded by DURATION_MS only */
    else
        max_msgs += warmup;
    if (max_msgs < warmup + 2)
        max_msgs = warmup + 2;

    alarm((unsigned)timeout_s);
    struct ring *r = shared_map(sizeof(struct ring));

    pid_t pid = fork_child();
    if (pid == 0) {
        alarm((unsigned)timeout_s);
        pin_to(cpu_child);
        produce(r, (uint64_t)max_msgs, (uint64_t)batch);
        _exit(0);
    }
    pin_to(cpu_parent);

    unsigned char buf[MSG_SIZE];
    uint64_t head = 0, tail_cache = 0, head_pub = 0, t_first = 0, t_last = 0, deadline = 0;
    uint64_t checksum = 0;
    int stopped = 0;
    for (;;) {
        if (head == tail_cache) {
            if (head_pub != head) {
                __atomic_store_n(&r->head, head, __ATOMIC_RELEASE);
                head_pub = head;
            }
            tail_cache = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
            if (head == tail_cache) {
                if (__atomic_load_n(&r->done, __ATOMIC_ACQUIRE) &&
                    head == __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE)) {
                    t_last = now_ns();
                    break;
                }
                cpu_relax();
                continue;
            }
        }
        memcpy(buf, r->slots[head & MASK].data, MSG_SIZE);
        uint64_t seq;
        memcpy(&seq, buf, sizeof seq);
        if (seq != head) {
            fprintf(stderr, "error: expected message %llu, got %llu\n",
                    (unsigned long long)head, (unsigned long long)seq);
            kill(pid, SIGKILL);
            reap(pid);
            return 2;
        }
        checksum += buf[MSG_SIZE - 1];
        head++;
        if (head - head_pub >= (uint64_t)batch) {
            __atomic_store_n(&r->head, head, __ATOMIC_RELEASE);
            head_pub = head;
        }
        if (head == (uint64_t)warmup + 1) {
            t_first = now_ns();
            deadline = t_first + (uint64_t)duration_ms * 1000000ull;
        }
        if (!stopped && (head & 4095u) == 0 && t_first && now_ns() >= deadline) {
            __atomic_store_n(&r->stop, 1, __ATOMIC_RELAXED);
            stopped = 1;
        }
    }
    int rc = reap(pid);
    if (rc != 0) {
        fprintf(stderr, "error: child exited with %d\n", rc);
        return 2;
    }
    uint64_t counted = head > (uint64_t)warmup ? head - (uint64_t)warmup : 0;
    if (counted < 2 || t_last <= t_first) {
        fprintf(stderr, "error: too few messages (%llu)\n", (unsigned long long)counted);
        return 2;
    }
    uint64_t elapsed = t_last - t_first;
    printf("msgs=%llu elapsed_ns=%llu msgs_per_s=%.1f checksum=%llu\n", (unsigned long long)counted,
           (unsigned long long)elapsed, (double)(counted - 1) * 1e9 / (double)elapsed,
           (unsigned long long)checksum);
    return 0;
}
