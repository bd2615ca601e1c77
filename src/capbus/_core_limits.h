/*
 * capbus capability limits: reading them from the kernel's control page, and the token buckets
 * that both ends use for rate and bandwidth. No Python API and no allocation in here.
 *
 * The control page is written only by the trusted kernel, which may change any limit at any
 * time. It writes the limit fields first and CTRL_FLAGS_OFF last (a seq_cst store); we load the
 * flags with ACQUIRE and the fields after them with RELAXED loads, so a reader that sees
 * CTRL_F_ENFORCE also sees the limits written before it. Each field is read with one aligned
 * atomic load, so it is never torn; a message checked while the kernel changes several fields may
 * see some old and some new values, each of which the kernel wanted at some point: harmless.
 *
 * Every end keeps its own buckets in private memory: the server never trusts anything the client
 * could write for them, and a client that skips its own checks is still held by the server's.
 */
#ifndef CAPBUS_CORE_LIMITS_H
#define CAPBUS_CORE_LIMITS_H

#include <stdint.h>
#include <time.h>

#include "_core_layout.h"

/* Everything here is small and sits on the per-message path: always inlined, even into the
 * out-of-line (cold) functions that call it (GCC would otherwise compile those calls for size). */
#define LIM_INLINE static inline __attribute__((always_inline))

/* Clocks. The checks run per message, so they read CLOCK_MONOTONIC_COARSE (a few ns: the time of
 * the last tick, never ahead of CLOCK_MONOTONIC and behind it by at most a tick, 1-4 ms). That is
 * plenty for the buckets (a late refill only admits less). Expiry is exact: only within
 * EXPIRY_MARGIN_NS of the expiry time -- far more than a tick -- is CLOCK_MONOTONIC read. */
#define EXPIRY_MARGIN_NS 50000000ull

LIM_INLINE uint64_t clock_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

LIM_INLINE uint64_t coarse_ns(void) { return clock_ns(CLOCK_MONOTONIC_COARSE); }

typedef struct {
    uint32_t rights;
    uint64_t expiry;    /* CLOCK_MONOTONIC absolute ns, 0 = none */
    uint64_t max_size;  /* payload bytes, 0 = none */
    uint64_t rate;      /* messages/s, 0 = none */
    uint64_t bandwidth; /* payload bytes/s, 0 = none */
} limits_t;

/* Why a message was refused, in the order the checks run. LIM_NREASONS sizes counter arrays. */
enum { LIM_OK = 0, LIM_RIGHTS, LIM_EXPIRED, LIM_SIZE, LIM_RATE, LIM_BANDWIDTH, LIM_NREASONS };

/* ACQUIRE: pairs with the kernel's seq_cst store of the flags, which it writes after the limit
 * fields (see above). */
LIM_INLINE uint32_t ctrl_flags(const char *ctrl)
{
    return __atomic_load_n((const uint32_t *)(ctrl + CTRL_FLAGS_OFF), __ATOMIC_ACQUIRE);
}

/* RELAXED: ordered after ctrl_flags()'s ACQUIRE, which is all the ordering they need. */
LIM_INLINE void ctrl_limits(const char *ctrl, limits_t *l)
{
    l->rights = __atomic_load_n((const uint32_t *)(ctrl + CTRL_RIGHTS_OFF), __ATOMIC_RELAXED);
    l->expiry = __atomic_load_n((const uint64_t *)(ctrl + CTRL_EXPIRY_OFF), __ATOMIC_RELAXED);
    l->max_size =
        __atomic_load_n((const uint64_t *)(ctrl + CTRL_MAX_MESSAGE_SIZE_OFF), __ATOMIC_RELAXED);
    l->rate = __atomic_load_n((const uint64_t *)(ctrl + CTRL_RATE_LIMIT_OFF), __ATOMIC_RELAXED);
    l->bandwidth = __atomic_load_n((const uint64_t *)(ctrl + CTRL_BANDWIDTH_OFF), __ATOMIC_RELAXED);
}

LIM_INLINE int limits_need_clock(const limits_t *l)
{
    return l->expiry || l->rate || l->bandwidth;
}

/* Is the capability expired? `coarse` is coarse_ns(); see the clock comment above. */
LIM_INLINE int limits_expired(const limits_t *l, uint64_t coarse)
{
    if (!l->expiry || coarse + EXPIRY_MARGIN_NS < l->expiry)
        return 0;
    return clock_ns(CLOCK_MONOTONIC) >= l->expiry;
}

/* The checks that need no state: rights, expiry (`coarse` = coarse_ns()), size. */
LIM_INLINE int limits_static(const limits_t *l, uint64_t coarse, uint64_t plen)
{
    if (!(l->rights & RIGHT_SEND))
        return LIM_RIGHTS;
    if (limits_expired(l, coarse))
        return LIM_EXPIRED;
    if (l->max_size && plen > l->max_size)
        return LIM_SIZE;
    return LIM_OK;
}

/* Two token buckets. Rate: capacity `rate` tokens (one second of burst), refilled at rate/s, one
 * token per message. Bandwidth: capacity `bandwidth` bytes, refilled at bandwidth B/s, a message
 * costs its payload length. Both start full. When the kernel changes a limit, the level is
 * clamped to the new capacity; a limit that appears (from none) starts full. Doubles: exact
 * enough for any rate (a token is 1.0) and no overflow for any u64 limit or elapsed time. */
typedef struct {
    double rate_tokens, bw_tokens;
    uint64_t rate_cap, bw_cap; /* the limits the levels belong to (0: none) */
    uint64_t last_ns;          /* last refill */
} bucket_t;

LIM_INLINE double min_d(double a, double b) { return a < b ? a : b; }

LIM_INLINE void bucket_refill(bucket_t *b, const limits_t *l, uint64_t now)
{
    if (now == b->last_ns && l->rate == b->rate_cap && l->bandwidth == b->bw_cap)
        return; /* same tick (coarse clock), same limits: nothing to add */
    double dt = now > b->last_ns ? (double)(now - b->last_ns) * 1e-9 : 0.0;
    b->last_ns = now;
    /* Accrue at the limits in force so far (as far as we know), then adopt the new ones. */
    if (b->rate_cap)
        b->rate_tokens = min_d((double)b->rate_cap, b->rate_tokens + dt * (double)b->rate_cap);
    if (l->rate != b->rate_cap) {
        b->rate_tokens = b->rate_cap ? min_d(b->rate_tokens, (double)l->rate) : (double)l->rate;
        b->rate_cap = l->rate;
    }
    if (b->bw_cap)
        b->bw_tokens = min_d((double)b->bw_cap, b->bw_tokens + dt * (double)b->bw_cap);
    if (l->bandwidth != b->bw_cap) {
        b->bw_tokens = b->bw_cap ? min_d(b->bw_tokens, (double)l->bandwidth) : (double)l->bandwidth;
        b->bw_cap = l->bandwidth;
    }
}

/* Refill, then: may a message of `plen` payload bytes go now (`now` = coarse_ns())? Takes
 * nothing. */
LIM_INLINE int bucket_check(bucket_t *b, const limits_t *l, uint64_t now, uint64_t plen)
{
    if (!l->rate && !l->bandwidth) {
        b->rate_cap = b->bw_cap = 0;
        return LIM_OK;
    }
    bucket_refill(b, l, now);
    if (l->rate && b->rate_tokens < 1.0)
        return LIM_RATE;
    if (l->bandwidth && b->bw_tokens < (double)plen)
        return LIM_BANDWIDTH;
    return LIM_OK;
}

/* Take the tokens of a message that bucket_check() let through. */
LIM_INLINE void bucket_take(bucket_t *b, const limits_t *l, uint64_t plen)
{
    if (l->rate)
        b->rate_tokens -= 1.0;
    if (l->bandwidth)
        b->bw_tokens -= (double)plen;
}

#endif
