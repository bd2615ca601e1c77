/*
 * _native/metrics.h: The metrics writers: plain stores of private counters into the CSTATS /
 * SSTATS blocks of the channel header page (single writer each). With or without the GIL.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_METRICS_H
#define CAPBUS_NATIVE_METRICS_H

/* ---- Metrics counters (the CSTATS / SSTATS blocks of the channel header page). -------------
 * One writer per block (the Lane: one thread at a time; the ServerSet: every update runs under
 * the GIL, which serialises recv and reply threads). The writer keeps the values in private
 * memory and STORES them: no load of the shared copy, no LOCK-prefixed read-modify-write (there
 * is no second writer to race with), and a peer that scribbles the block cannot make us count
 * from its numbers. RELAXED: readers want each u64 untorn and nothing else; no other memory is
 * published with a counter. No syscall, no lock, a handful of stores to lines no peer writes. */

static inline void stat_store(char *blk, const uint64_t *priv, unsigned off)
{
    __atomic_store_n((uint64_t *)(blk + off), priv[off / 8], __ATOMIC_RELAXED); /* see above */
}

static inline void stat_add(char *blk, uint64_t *priv, unsigned off, uint64_t k)
{
    priv[off / 8] += k;
    stat_store(blk, priv, off);
}

/* The per-second bucket (same offsets in both blocks): `now` is any CLOCK_MONOTONIC reading
 * (coarse or not). k messages happened now. */
static inline void stat_second(char *blk, uint64_t *priv, uint64_t now, uint64_t k)
{
    uint64_t sec = now / 1000000000ull;
    uint64_t *idx = &priv[STATS_SEC_INDEX_OFF / 8], *cnt = &priv[STATS_SEC_COUNT_OFF / 8];
    if (__builtin_expect(sec == *idx, 1)) {
        *cnt += k;
        stat_store(blk, priv, STATS_SEC_COUNT_OFF);
        return;
    }
    priv[STATS_PREV_COUNT_OFF / 8] = sec == *idx + 1 ? *cnt : 0;
    *cnt = k;
    *idx = sec;
    stat_store(blk, priv, STATS_PREV_COUNT_OFF);
    stat_store(blk, priv, STATS_SEC_COUNT_OFF);
    stat_store(blk, priv, STATS_SEC_INDEX_OFF);
}

/* Histogram bucket of a round trip: i with BASE * 2^i <= ns < BASE * 2^(i+1), clamped. */
static inline unsigned stat_hist_bucket(uint64_t ns)
{
    uint64_t q = ns / STATS_HIST_BASE_NS;
    if (q < 2)
        return 0;
    unsigned b = 63u - (unsigned)__builtin_clzll(q);
    return b < STATS_HIST_BUCKETS ? b : STATS_HIST_BUCKETS - 1;
}

#endif /* CAPBUS_NATIVE_METRICS_H */
