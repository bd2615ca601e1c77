/*
 * _native/futex.h: Engine (no Python API): the shared futex syscalls. Any thread, with or without
 * the GIL. The store fences of the Dekker pairs with a sleeping peer are in fence.h (they need the
 * rings; this file is also part of the kernel's capbus._layout, which has none).
 * Not compiled alone: module.c and layout_module.c #include it (see there).
 */
#ifndef CAPBUS_NATIVE_FUTEX_H
#define CAPBUS_NATIVE_FUTEX_H

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

#endif /* CAPBUS_NATIVE_FUTEX_H */
