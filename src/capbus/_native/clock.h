/*
 * _native/clock.h: Engine (no Python API): the monotonic clock and the call-latency clock (TSC
 * where the kernel's clocksource is the TSC, else CLOCK_MONOTONIC). Any thread, with or without
 * the GIL.
 * Not compiled alone: module.c and layout_module.c (capbus._layout) #include it (see there).
 */
#ifndef CAPBUS_NATIVE_CLOCK_H
#define CAPBUS_NATIVE_CLOCK_H

/* ---------------------------------------------------------------------------------------------
 * Clock and futex helpers.
 * ------------------------------------------------------------------------------------------- */

static inline uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
/* coarse_ns() (in limits.h): CLOCK_MONOTONIC_COARSE, for checks that tolerate a tick. */

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

#endif /* CAPBUS_NATIVE_CLOCK_H */
