/*
 * _native/futex.h: Engine (no Python API): shared futex syscalls, store fences and the producer's
 * publish fence (the Dekker pairs with a sleeping peer). Any thread, with or without the GIL.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
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

/* The first half of every Dekker handshake here: store our flag, then a full fence before we
 * look at the peer's. On x86 a single XCHG does both (a locked instruction is a full barrier,
 * and as a SEQ_CST read-modify-write the compiler keeps later loads after it); it costs less
 * than MOV + MFENCE. Elsewhere: a RELAXED store and a SEQ_CST fence. */
#if defined(__x86_64__) || defined(__i386__)
#define CB_X86 1
#else
#define CB_X86 0
#endif

static inline void store_fence_u32(uint32_t *p, uint32_t v)
{
#if CB_X86
    __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
#else
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* prod_publish, then a full fence: the producer's half of the handshake ("publish the tail;
 * fence; load the consumer's flags"). On x86 the tail goes out with one XCHG (SEQ_CST, which is
 * also the RELEASE prod_publish gives). */
static inline void prod_publish_fence(prod_t *p)
{
#if CB_X86
    if (p->published != p->tail) {
        p->published = p->tail;
        __atomic_exchange_n(ring_u64(p->ring, RING_TAIL_OFF), p->tail, __ATOMIC_SEQ_CST);
        return;
    }
#else
    prod_publish(p);
#endif
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

#endif /* CAPBUS_NATIVE_FUTEX_H */
