/*
 * _native/gil_lock.h: gil_lock_t: a lock only ever TAKEN with the GIL held (recv_mu, a channel's
 * reply lock), released with or without it.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_GIL_LOCK_H
#define CAPBUS_NATIVE_GIL_LOCK_H

/* A lock that is only ever TAKEN by a thread holding the GIL (recv_mu, a channel's reply lock).
 * The GIL serialises every acquisition, so taking a free lock is a load and a store: no locked
 * instruction, no library call. The holder may then let the GIL go (recv sleeps, a big reply is
 * copied) and may release the lock without it. A thread that finds the lock held waits with the
 * GIL released and tries again with it (the free-threaded build has no GIL: see the check at
 * the top of module.c). */
typedef struct {
    uint32_t held;    /* atomic: 0 or 1 */
    uint32_t waiters; /* threads in gl_acquire's wait (changed under the GIL) */
} gil_lock_t;

static inline int gl_try(gil_lock_t *l) /* GIL held */
{
    /* ACQUIRE: the previous holder's writes (RELEASEd in gl_release, possibly without the GIL)
     * are visible to us. No other thread can take it between the load and the store. */
    if (__atomic_load_n(&l->held, __ATOMIC_ACQUIRE))
        return 0;
    __atomic_store_n(&l->held, 1, __ATOMIC_RELAXED);
    return 1;
}

/* GIL held on entry and exit; released while the lock is held by another thread. */
static void gl_acquire(gil_lock_t *l)
{
    if (gl_try(l))
        return;
    l->waiters++;
    do {
        /* The holder wakes the word when it lets go and sees a waiter; the 1 ms bound makes a
         * wake-up lost to the unordered read of `waiters` cost 1 ms, not a hang. */
        Py_BEGIN_ALLOW_THREADS
        sys_futex_wait(&l->held, 1, 1000000, 0);
        Py_END_ALLOW_THREADS
    } while (!gl_try(l));
    l->waiters--;
}

static inline void gl_release(gil_lock_t *l) /* with or without the GIL */
{
    __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE); /* RELEASE: pairs with gl_try's ACQUIRE */
    if (__atomic_load_n(&l->waiters, __ATOMIC_RELAXED))
        sys_futex_wake(&l->held, 1);
}

#endif /* CAPBUS_NATIVE_GIL_LOCK_H */
