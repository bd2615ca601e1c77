/* Shared helpers for the capbus C benchmark anchors (peers benchmarks).
 *
 * Each anchor is a single program that forks one child, pins the two
 * processes (optional), measures, reaps the child and prints one line of
 * "key=value" pairs on stdout.  Both processes arm alarm() so that nothing
 * outlives a hung run, and the child dies with its parent (PR_SET_PDEATHSIG).
 */
#ifndef CAPBUS_BENCH_COMMON_H
#define CAPBUS_BENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CACHE_LINE 64
#define MSG_SIZE 48

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "error: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Pin the calling process to one CPU; cpu < 0 leaves the affinity alone. */
__attribute__((unused)) static void pin_to(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        die("sched_setaffinity");
}

static void *shared_map(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    memset(p, 0, size);
    return p;
}

/* Fork the child; in the child, arrange to die with the parent. */
static pid_t fork_child(void)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(3);
    }
    return pid;
}

static int reap(pid_t pid)
{
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            die("waitpid");
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile (q in (0, 1]) of a sorted array. */
static uint64_t percentile(const uint64_t *sorted, size_t n, double q)
{
    size_t rank = (size_t)(q * (double)n + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

/* Print the latency summary line of a ping-pong anchor. */
__attribute__((unused)) static void report_latency(uint64_t *samples, size_t n, uint64_t total_ns)
{
    qsort(samples, n, sizeof(uint64_t), cmp_u64);
    printf("iters=%zu median_ns=%llu p99_ns=%llu min_ns=%llu max_ns=%llu mean_ns=%.1f\n", n,
           (unsigned long long)percentile(samples, n, 0.5),
           (unsigned long long)percentile(samples, n, 0.99), (unsigned long long)samples[0],
           (unsigned long long)samples[n - 1], n ? (double)total_ns / (double)n : 0.0);
}

static long arg_long(int argc, char **argv, int i, long dflt)
{
    return i < argc ? strtol(argv[i], NULL, 10) : dflt;
}

#endif
