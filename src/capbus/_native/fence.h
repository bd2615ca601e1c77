/*
 * _native/fence.h: Engine (no Python API): store fences and the producer's publish fence (the
 * Dekker pairs with a sleeping peer). Any thread, with or without the GIL. Needs ring.h (prod_t).
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_FENCE_H
#define CAPBUS_NATIVE_FENCE_H

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

#endif /* CAPBUS_NATIVE_FENCE_H */
