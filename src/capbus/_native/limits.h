/*
 * capbus capability limits: reading them from the kernel's control page, the token buckets that
 * both ends use for rate and bandwidth, and the receiver's table of buckets per capability. No
 * Python API; the table allocates only when a channel is added, never per message.
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
 * The client's are per lane (advisory: they only fail fast). The server's belong to capabilities
 * (see "Buckets per capability" below): every channel, thread and process using one capability,
 * or one derived from it, draws on the same buckets.
 */
#ifndef CAPBUS_NATIVE_LIMITS_H
#define CAPBUS_NATIVE_LIMITS_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "layout.h"

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

LIM_INLINE void bucket_refill_rb(bucket_t *b, uint64_t rate, uint64_t bw, uint64_t now)
{
    if (now == b->last_ns && rate == b->rate_cap && bw == b->bw_cap)
        return; /* same tick (coarse clock), same limits: nothing to add */
    double dt = now > b->last_ns ? (double)(now - b->last_ns) * 1e-9 : 0.0;
    b->last_ns = now;
    /* Accrue at the limits in force so far (as far as we know), then adopt the new ones. */
    if (b->rate_cap)
        b->rate_tokens = min_d((double)b->rate_cap, b->rate_tokens + dt * (double)b->rate_cap);
    if (rate != b->rate_cap) {
        b->rate_tokens = b->rate_cap ? min_d(b->rate_tokens, (double)rate) : (double)rate;
        b->rate_cap = rate;
    }
    if (b->bw_cap)
        b->bw_tokens = min_d((double)b->bw_cap, b->bw_tokens + dt * (double)b->bw_cap);
    if (bw != b->bw_cap) {
        b->bw_tokens = b->bw_cap ? min_d(b->bw_tokens, (double)bw) : (double)bw;
        b->bw_cap = bw;
    }
}

/* Refill, then: may a message of `plen` payload bytes go now (`now` = coarse_ns())? Takes
 * nothing. */
LIM_INLINE int bucket_check_rb(bucket_t *b, uint64_t rate, uint64_t bw, uint64_t now,
                               uint64_t plen)
{
    if (!rate && !bw) {
        b->rate_cap = b->bw_cap = 0;
        return LIM_OK;
    }
    bucket_refill_rb(b, rate, bw, now);
    if (rate && b->rate_tokens < 1.0)
        return LIM_RATE;
    if (bw && b->bw_tokens < (double)plen)
        return LIM_BANDWIDTH;
    return LIM_OK;
}

/* Take the tokens of a message that bucket_check_rb() let through. */
LIM_INLINE void bucket_take_rb(bucket_t *b, uint64_t rate, uint64_t bw, uint64_t plen)
{
    if (rate)
        b->rate_tokens -= 1.0;
    if (bw)
        b->bw_tokens -= (double)plen;
}

LIM_INLINE int bucket_check(bucket_t *b, const limits_t *l, uint64_t now, uint64_t plen)
{
    return bucket_check_rb(b, l->rate, l->bandwidth, now, plen);
}

LIM_INLINE void bucket_take(bucket_t *b, const limits_t *l, uint64_t plen)
{
    bucket_take_rb(b, l->rate, l->bandwidth, plen);
}

/* ---- Buckets per capability (the receiver's) ---------------------------------------------
 *
 * One cbkt_t per capability id (CTRL_CAP_ID_OFF, and each id of the CTRL_CHAIN_OFF chain), in a
 * hash table private to one ServerSet. A channel pins the buckets of its chain when it is added
 * (the only lookup: each message then follows the channel's pointers) and unpins them when it is
 * freed. An unpinned bucket is kept on the idle list, oldest first, so a client that closes and
 * reopens its channels finds its old level; it is freed lazily (at the next add or remove) once
 * idle for BKT_IDLE_NS, by when it has refilled to its capacity (one second of its limit), so a
 * fresh bucket is the same thing. Memory: pinned buckets are at most (1 + CTRL_CHAIN_MAX) per
 * channel, idle ones at most BUCKET_IDLE_MAX: more than that go oldest first, even before they
 * refilled. That gives a capability at most one burst back, and only after BUCKET_IDLE_MAX other
 * capabilities went idle within a second; any ancestor's bucket still holds (an ancestor is
 * pinned again, and so made the newest, by every channel of its descendants). */
#define BKT_IDLE_NS 1100000000ull /* one second of refill, plus the coarse clock's tick */
#define BUCKET_IDLE_MAX 1024u

typedef struct cbkt {
    bucket_t b;
    uint64_t id;
    uint64_t idle_since;       /* coarse_ns() when its last channel let go */
    uint32_t pins;             /* channels whose chain holds it */
    struct cbkt *prev, *next;  /* the idle list (pins == 0), oldest first */
} cbkt_t;

typedef struct {
    cbkt_t **slot;             /* open addressing, linear probing; size a power of two */
    uint32_t size, n;
    cbkt_t *idle_head, *idle_tail;
    uint32_t nidle;
} btab_t;

static inline uint32_t btab_home(const btab_t *t, uint64_t id)
{
    return (uint32_t)((id * 0x9E3779B97F4A7C15ull) >> 32) & (t->size - 1);
}

static cbkt_t *btab_find(const btab_t *t, uint64_t id)
{
    if (!t->size)
        return NULL;
    for (uint32_t i = btab_home(t, id);; i = (i + 1) & (t->size - 1)) {
        cbkt_t *c = t->slot[i];
        if (!c || c->id == id)
            return c;
    }
}

static void btab_place(btab_t *t, cbkt_t *c)
{
    uint32_t i = btab_home(t, c->id);
    while (t->slot[i])
        i = (i + 1) & (t->size - 1);
    t->slot[i] = c;
}

/* Room for one more (load <= 1/2). 0, or -1 when out of memory (nothing changed). */
static int btab_reserve(btab_t *t)
{
    if (2 * (t->n + 1) <= t->size)
        return 0;
    uint32_t size = t->size ? 2 * t->size : 64;
    cbkt_t **slot = calloc(size, sizeof *slot);
    if (!slot)
        return -1;
    cbkt_t **old = t->slot;
    uint32_t old_size = t->size;
    t->slot = slot;
    t->size = size;
    for (uint32_t i = 0; i < old_size; i++)
        if (old[i])
            btab_place(t, old[i]);
    free(old);
    return 0;
}

/* Take c out of the hash (backward-shift deletion: no tombstones, so probes stay short). */
static void btab_delete(btab_t *t, cbkt_t *c)
{
    uint32_t mask = t->size - 1, i = btab_home(t, c->id);
    while (t->slot[i] != c)
        i = (i + 1) & mask;
    for (uint32_t j = (i + 1) & mask; t->slot[j]; j = (j + 1) & mask) {
        uint32_t h = btab_home(t, t->slot[j]->id);
        /* slot[j] may move into the hole at i unless its home lies cyclically in (i, j]. */
        if (((j - h) & mask) >= ((j - i) & mask)) {
            t->slot[i] = t->slot[j];
            i = j;
        }
    }
    t->slot[i] = NULL;
    t->n--;
}

static void btab_idle_unlink(btab_t *t, cbkt_t *c)
{
    *(c->prev ? &c->prev->next : &t->idle_head) = c->next;
    *(c->next ? &c->next->prev : &t->idle_tail) = c->prev;
    c->prev = c->next = NULL;
    t->nidle--;
}

/* Free the idle buckets that have refilled, and the oldest beyond BUCKET_IDLE_MAX. */
static void btab_sweep(btab_t *t, uint64_t now)
{
    cbkt_t *c;
    while ((c = t->idle_head) &&
           (t->nidle > BUCKET_IDLE_MAX || now - c->idle_since >= BKT_IDLE_NS)) {
        btab_idle_unlink(t, c);
        btab_delete(t, c);
        free(c);
    }
}

/* The bucket of capability `id`, pinned (found, or made full: bucket_refill_rb fills a bucket
 * whose limits appear). NULL when out of memory. */
static cbkt_t *btab_pin(btab_t *t, uint64_t id, uint64_t now)
{
    btab_sweep(t, now);
    cbkt_t *c = btab_find(t, id);
    if (c) {
        if (c->pins++ == 0)
            btab_idle_unlink(t, c);
        return c;
    }
    if (btab_reserve(t) < 0 || !(c = calloc(1, sizeof *c)))
        return NULL;
    c->id = id;
    c->b.last_ns = now;
    c->pins = 1;
    btab_place(t, c);
    t->n++;
    return c;
}

static void btab_unpin(btab_t *t, cbkt_t *c, uint64_t now)
{
    if (--c->pins == 0) {
        c->idle_since = now;
        c->prev = t->idle_tail;
        c->next = NULL;
        *(t->idle_tail ? &t->idle_tail->next : &t->idle_head) = c;
        t->idle_tail = c;
        t->nidle++;
    }
    btab_sweep(t, now);
}

/* Every bucket goes (the ServerSet is closed; no channel points at them any more). */
static void btab_free(btab_t *t)
{
    for (uint32_t i = 0; i < t->size; i++)
        free(t->slot[i]);
    free(t->slot);
    t->slot = NULL;
    t->size = t->n = t->nidle = 0;
    t->idle_head = t->idle_tail = NULL;
}

#endif
