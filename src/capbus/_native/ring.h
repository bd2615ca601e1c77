/*
 * capbus ring engine: single-producer single-consumer rings of 64-byte slots plus a FIFO arena
 * for payloads, in shared memory that the OTHER side may scribble over at any time.
 *
 * No Python API in here and no allocation: every function may run with or without the GIL.
 *
 * Trust rules. Each side keeps its own cursors in private memory (prod_t / cons_t) and only ever
 * WRITES its own shared fields; it READS the peer's fields (and the peer-written slots/chunks)
 * exactly once per use into locals, validates the locals against its private cursors, and then
 * uses only the locals. A value that fails validation yields RG_CORRUPT with a static reason
 * string, and the caller stops using the channel. Nothing here loops on a shared value.
 *
 * Memory orders (the pairs):
 *   producer: write slot + chunk (plain stores) -> tail.store(RELEASE)
 *   consumer: tail.load(ACQUIRE) -> read slot + chunk (relaxed atomic loads, see cons_peek)
 *   consumer: read slot + chunk -> arena_released.store(RELEASE) and head.store(RELEASE)
 *   producer: head.load(ACQUIRE) / arena_released.load(ACQUIRE) -> overwrite slot / chunk
 * The RELEASE on the consumer side makes its reads of a slot/chunk happen-before the producer's
 * reuse of that memory (the producer's ACQUIRE load pairs with it), so a slot is never recycled
 * under a reader.
 *
 * Zero-copy receive: a consumer may keep chunks after their slots went back (cons_consume) and
 * release them in any order; it then publishes arena_released itself, only ever as the end of the
 * contiguous released prefix (cons_publish_released), so a held chunk is never reused.
 */
#ifndef CAPBUS_NATIVE_RING_H
#define CAPBUS_NATIVE_RING_H

#include <stdint.h>
#include <string.h>

#include "layout.h"

#ifndef HOT
#define HOT /* module.c marks the functions of a round trip (see there) */
#endif

enum { RG_OK = 0, RG_EMPTY = 1, RG_FULL = 2, RG_CORRUPT = -1 };

static inline uint64_t *ring_u64(char *ring, uint32_t off) { return (uint64_t *)(ring + off); }
static inline uint32_t *ring_u32(char *ring, uint32_t off) { return (uint32_t *)(ring + off); }
static inline char *ring_slot(char *ring, uint64_t i) { return ring + RING_SLOTS_OFF + i * SLOT_SIZE; }

#include "crc32.h"

/* Copy n bytes (a multiple of 8, 8-aligned) out of peer-writable memory with relaxed atomic
 * loads: the peer may be writing concurrently (only if hostile), and atomic loads make that a
 * well-defined race whose result we then validate, instead of undefined behaviour the compiler
 * could exploit (e.g. by re-reading a field after we validated it). */
static inline void copy_in_words(void *dst, const char *src, size_t n)
{
    uint64_t *d = dst;
    const uint64_t *s = (const uint64_t *)src;
    for (size_t i = 0; i < n / 8; i++)
        d[i] = __atomic_load_n(&s[i], __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------------------------------------
 * Producer.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    char *ring;         /* ring header in the mapping */
    char *arena;
    uint64_t nslots;    /* power of two, trusted (from the kernel, not from the header page) */
    uint64_t asize;     /* multiple of 4096, trusted */
    uint64_t tail;      /* private: messages written (published or not) */
    uint64_t published; /* private: last value stored to the shared tail */
    uint64_t head_seen; /* last consumer head observed: the shared head must never go back */
    uint64_t cursor;    /* private virtual arena cursor (bytes ever allocated, incl. wrap gaps) */
    uint64_t rel_seen;  /* last arena_released observed: must never go back */
    uint64_t jump_from; /* last fresh-lap jump: a release value of exactly jump_from (everything */
    uint64_t jump_to;   /* released, the consumer has not seen the jump yet) counts as jump_to */
} prod_t;

/* An arena chunk found by prod_reserve and not committed yet: nothing is written and the cursor
 * has not moved, so dropping a reservation needs no undo (as long as nothing else is reserved
 * and committed meanwhile: a loan blocks every other payload while it is out). */
typedef struct {
    uint64_t off;       /* arena offset of the chunk */
    uint64_t len;       /* chunk bytes (chunk_len_for(plen)) */
    uint64_t newcur;    /* the cursor once committed */
    uint64_t jump_from, jump_to; /* a fresh-lap jump to commit with it (jump_to 0: none) */
} prod_res_t;

/* An outgoing message, fully validated by the caller (ranges, flags, payload <= max). */
typedef struct {
    uint64_t capability;
    uint32_t opcode;
    uint32_t flags; /* final flags (FLAG_LARGE etc. already decided by the caller) */
    uint64_t data[4];
    uint64_t tag;
    const uint8_t *payload; /* NULL = no payload (distinct from an empty payload); for a loan,
                               the reserved chunk's own payload area (nothing is copied) */
    uint64_t plen;
} outmsg_t;

/* How many more slots the producer may write (at least `want` if it can). RG_CORRUPT if the
 * consumer's head is impossible. */
static HOT int prod_slots_free(prod_t *p, uint64_t want, uint64_t *nfree, const char **why)
{
    /* The head we saw last is a lower bound of the real one: while it leaves room for `want`
     * messages, skip the load. The consumer writes that cache line for every message, so reading
     * it for every message moved the line between the CPUs each time (the classic cached-index
     * SPSC ring). Nothing unvalidated is trusted: head_seen was checked when it was read. */
    if (p->nslots - (p->tail - p->head_seen) >= want) {
        *nfree = p->nslots - (p->tail - p->head_seen);
        return RG_OK;
    }
    /* ACQUIRE: pairs with the consumer's RELEASE store of head, so its reads of the slots it has
     * passed happen-before we overwrite them. */
    uint64_t h = __atomic_load_n(ring_u64(p->ring, RING_HEAD_OFF), __ATOMIC_ACQUIRE);
    if (h < p->head_seen || h > p->published) {
        *why = "ring head moved backwards or past the tail";
        return RG_CORRUPT;
    }
    p->head_seen = h;
    *nfree = p->nslots - (p->tail - h); /* tail - h <= nslots is our own invariant */
    return RG_OK;
}

/* Find room for the chunk of a `plen`-byte payload (<= max_payload_for(asize)) in the FIFO
 * arena. On RG_OK, *r says where; nothing is committed yet (prod_write_at does that).
 *
 * The cursor is virtual (it only grows); the offset is cursor % asize. A chunk that would cross
 * the arena end starts at the next lap (offset 0), and the skipped tail end counts as used until
 * the consumer's release passes it. When everything is released the cursor jumps to a fresh lap
 * so that an idle arena always offers all of its bytes contiguously (and keeps reusing the same,
 * already-faulted, cache-warm pages at the start). The consumer accepts a chunk either at its own
 * FIFO cursor or at offset 0 (see cons_read), which covers both kinds of jump.
 *
 * The consumer may hold chunks (zero-copy receive) and release them out of order; it publishes
 * only the contiguous released prefix, so to us a held chunk is just a slow consumer. */
enum { RES_NO_JUMP = 1, RES_WRAP = 2 };

/* prod_reserve with a choice of the other legal places (the consumer takes a chunk at its FIFO
 * cursor or at offset 0): RES_NO_JUMP stays at the cursor when idle instead of jumping to a fresh
 * lap; RES_WRAP starts at the next lap (offset 0) even if the chunk would fit before the arena
 * end (the skipped bytes count as used, as for an ordinary wrap). For a producer that must keep
 * some arena memory untouched (a loan view still shows it). */
static int prod_reserve_at(prod_t *p, uint64_t plen, int how, prod_res_t *r, const char **why)
{
    uint64_t len = chunk_len_for(plen);
    /* ACQUIRE: pairs with the consumer's RELEASE of arena_released, so its reads of released
     * chunks happen-before we overwrite them. */
    uint64_t rel = __atomic_load_n(ring_u64(p->ring, RING_ARENA_RELEASED_OFF), __ATOMIC_ACQUIRE);
    if (rel < p->rel_seen) {
        *why = "arena_released moved backwards";
        return RG_CORRUPT;
    }
    p->rel_seen = rel;
    /* After a fresh-lap jump from X to L the consumer's release stays at X (all released) until
     * it meets the chunk at offset 0 and moves past L; the bytes between count as free. */
    if (rel == p->jump_from && p->jump_to)
        rel = p->jump_to;
    if (rel > p->cursor || p->cursor - rel > p->asize) {
        *why = "arena_released out of range";
        return RG_CORRUPT;
    }
    uint64_t cur = p->cursor;
    int jump = 0;
    if (rel == cur && cur % p->asize != 0 && !(how & RES_NO_JUMP)) { /* idle: fresh lap */
        cur += p->asize - cur % p->asize;
        rel = cur;
        jump = 1;
    }
    uint64_t o = cur % p->asize;
    uint64_t start = (o + len <= p->asize && !(o && (how & RES_WRAP))) ? cur : cur + (p->asize - o);
    if (start + len - rel > p->asize)
        return RG_FULL;
    r->jump_from = jump ? p->cursor : 0;
    r->jump_to = jump ? cur : 0;
    r->off = start % p->asize;
    r->len = len;
    r->newcur = start + len;
    return RG_OK;
}

static inline int prod_reserve(prod_t *p, uint64_t plen, prod_res_t *r, const char **why)
{
    return prod_reserve_at(p, plen, 0, r, why);
}

/* Where the payload bytes of a reserved chunk go: after the 128-byte LargeMessage struct for a
 * large payload, in its inline area for one of <= LM_INLINE_SIZE bytes. */
static inline char *prod_res_payload(const prod_t *p, const prod_res_t *r, uint64_t plen)
{
    return p->arena + r->off + (plen > LM_INLINE_SIZE ? LARGE_MSG_SIZE : LM_INLINE_OFF);
}

/* Write one message (the chunk reserved in *r if it has a payload, then the slot) and commit the
 * reservation, without publishing: the shared tail moves only in prod_publish, so a batch
 * becomes visible at once. The caller has checked prod_slots_free. May take long for big
 * payloads (copy + CRC): the caller drops the GIL around it for those. A payload that already
 * sits in the reserved chunk (a loan: m->payload == prod_res_payload) is not copied, and for an
 * inline one only the bytes around the inline area are written. */
static HOT void prod_write_at(prod_t *p, const outmsg_t *m, const prod_res_t *r)
{
    slot_t s;
    s.capability = m->capability;
    s.opcode = m->opcode;
    s.flags = m->flags;
    memcpy(s.data, m->data, sizeof s.data);
    s.tag = m->tag;
    s.payload_len = 0;
    s.payload_off = 0;
    if (m->payload) {
        large_msg_t lm;
        memset(&lm, 0, sizeof lm);
        lm.header.capability = m->capability;
        lm.header.opcode = m->opcode;
        lm.header.flags = m->flags;
        lm.header.total_size = m->plen;
        lm.header.checksum = (m->flags & FLAG_CHECKSUM) ? crc32_update(0, m->payload, m->plen) : 0;
        char *chunk = p->arena + r->off;
        int in_place = (const char *)m->payload == prod_res_payload(p, r, m->plen);
        if (m->plen > LM_INLINE_SIZE) {
            lm.region.base_addr = r->off + LARGE_MSG_SIZE;
            lm.region.size = m->plen;
            lm.region.permissions = REGION_PERM_READ;
            if (!in_place)
                memcpy(chunk + LARGE_MSG_SIZE, m->payload, m->plen);
            memcpy(chunk, &lm, sizeof lm);
        } else if (in_place) {
            memcpy(chunk, &lm, LM_INLINE_OFF);
            memcpy(chunk + LM_INLINE_OFF + LM_INLINE_SIZE, lm.pad, sizeof lm.pad);
        } else {
            if (m->plen)
                memcpy(lm.inline_data, m->payload, m->plen);
            memcpy(chunk, &lm, sizeof lm);
        }
        p->cursor = r->newcur;
        if (r->jump_to) {
            p->jump_from = r->jump_from;
            p->jump_to = r->jump_to;
        }
        s.payload_len = (uint32_t)r->len;
        s.payload_off = (uint32_t)r->off;
    }
    memcpy(ring_slot(p->ring, p->tail & (p->nslots - 1)), &s, sizeof s);
    p->tail++;
}

/* Reserve (if it has a payload) and write one message. RG_OK, RG_FULL (arena) or RG_CORRUPT. */
static HOT int prod_write(prod_t *p, const outmsg_t *m, const char **why)
{
    prod_res_t r = {0, 0, 0, 0, 0};
    if (m->payload) {
        int rc = prod_reserve(p, m->plen, &r, why);
        if (rc != RG_OK)
            return rc;
    }
    prod_write_at(p, m, &r);
    return RG_OK;
}

static inline void prod_publish(prod_t *p)
{
    if (p->published == p->tail)
        return;
    p->published = p->tail;
    /* RELEASE: every slot and chunk written before this store is visible to a consumer that
     * ACQUIRE-loads this tail value. */
    __atomic_store_n(ring_u64(p->ring, RING_TAIL_OFF), p->tail, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------------------------------------
 * Consumer.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    char *ring;
    char *arena;
    uint64_t nslots;
    uint64_t asize;
    uint64_t head;      /* private: messages consumed */
    uint64_t tail_seen; /* last producer tail observed: must never go back */
    uint64_t released;  /* private FIFO cursor: the end of the last chunk consumed (the next
                           chunk starts here or at 0). Published as arena_released by
                           cons_release; a consumer that holds chunks (cons_consume) publishes
                           a smaller value itself (cons_publish_released). */
} cons_t;

/* A received message: the validated slot and chunk header, copied into private memory. */
typedef struct {
    slot_t s;
    large_msg_t lm;
    int has_payload;
    uint64_t pay_off; /* arena offset of the payload bytes */
    uint64_t plen;
    uint64_t new_released;
} inmsg_t;

/* Is there a message? RG_EMPTY, RG_OK or RG_CORRUPT. */
static inline int cons_poll(cons_t *c, const char **why)
{
    /* Messages below the tail we saw last are known to be there: no need to load the tail (the
     * producer writes that line for every message; see prod_slots_free). */
    if (c->head < c->tail_seen)
        return RG_OK;
    /* ACQUIRE: pairs with the producer's RELEASE store of tail; the slots (and chunks) before
     * that tail are fully written when we read them. */
    uint64_t t = __atomic_load_n(ring_u64(c->ring, RING_TAIL_OFF), __ATOMIC_ACQUIRE);
    /* tail_seen >= head, so "moved backwards" is checked first and also catches a tail pulled
     * back to the head (which would otherwise read as "empty"). Unsigned: t < head wraps to a
     * huge difference, so the second test covers "behind the head" and "over a ring ahead". */
    if (t < c->tail_seen || t - c->head > c->nslots) {
        *why = "ring tail moved backwards or more than a ring ahead";
        return RG_CORRUPT;
    }
    if (t == c->head)
        return RG_EMPTY;
    c->tail_seen = t;
    return RG_OK;
}

/* Copy the slot at head (the caller saw RG_OK from cons_poll) and validate it and its chunk. */
static HOT int cons_read(cons_t *c, inmsg_t *m, const char **why)
{
    copy_in_words(&m->s, ring_slot(c->ring, c->head & (c->nslots - 1)), sizeof m->s);
    const slot_t *s = &m->s;
    if (s->flags & ~FLAG_KNOWN_MASK) {
        *why = "unknown flag bits in slot";
        return RG_CORRUPT;
    }
    if (s->payload_len == 0) {
        if (s->payload_off != 0 || (s->flags & (FLAG_LARGE | FLAG_CHECKSUM | FLAG_LOANED))) {
            *why = "slot without a chunk has chunk offset or payload flags";
            return RG_CORRUPT;
        }
        m->has_payload = 0;
        m->plen = 0;
        m->pay_off = 0;
        m->new_released = c->released;
        return RG_OK;
    }
    uint64_t len = s->payload_len, off = s->payload_off, A = c->asize;
    if (len % CHUNK_ALIGN || len < LARGE_MSG_SIZE || len > A) {
        *why = "bad chunk length";
        return RG_CORRUPT;
    }
    if (off % CHUNK_ALIGN || off > A - len) {
        *why = "chunk outside the arena";
        return RG_CORRUPT;
    }
    uint64_t rel = c->released, expect = rel % A;
    if (off != expect) {
        /* FIFO: the only other legal place is the start of the next lap (a wrap, or the
         * producer's fresh-lap jump after everything was released). */
        if (off != 0) {
            *why = "chunk not at the FIFO position";
            return RG_CORRUPT;
        }
        rel += A - expect;
    }
    m->new_released = rel + len;
    copy_in_words(&m->lm, c->arena + off, sizeof m->lm);
    const msg_header_t *h = &m->lm.header;
    const mem_region_t *r = &m->lm.region;
    if (h->capability != s->capability || h->opcode != s->opcode || h->flags != s->flags ||
        h->pad != 0) {
        *why = "chunk header disagrees with the slot";
        return RG_CORRUPT;
    }
    uint64_t total = h->total_size;
    if (total <= LM_INLINE_SIZE) {
        if (len != LARGE_MSG_SIZE || (s->flags & FLAG_LARGE) || r->base_addr || r->size ||
            r->permissions || r->cache_policy) {
            *why = "bad inline payload descriptor";
            return RG_CORRUPT;
        }
        m->pay_off = off + LM_INLINE_OFF;
    } else {
        /* total <= len - 128 first, so round_up cannot overflow. */
        if (total > len - LARGE_MSG_SIZE || chunk_len_for(total) != len ||
            !(s->flags & FLAG_LARGE) || r->base_addr != off + LARGE_MSG_SIZE || r->size != total ||
            r->permissions != REGION_PERM_READ || r->cache_policy != 0) {
            *why = "bad large payload descriptor";
            return RG_CORRUPT;
        }
        m->pay_off = off + LARGE_MSG_SIZE;
    }
    if (!(s->flags & FLAG_CHECKSUM) && h->checksum != 0) {
        *why = "checksum present without FLAG_CHECKSUM";
        return RG_CORRUPT;
    }
    m->has_payload = 1;
    m->plen = total;
    return RG_OK;
}

/* Copy the payload out (into private memory) and verify its checksum on the COPY, so what we
 * deliver is exactly what we verified even if the peer rewrites the arena meanwhile. */
static int cons_copy_payload(cons_t *c, const inmsg_t *m, uint8_t *dst, const char **why)
{
    memcpy(dst, c->arena + m->pay_off, m->plen);
    if ((m->s.flags & FLAG_CHECKSUM) && crc32_update(0, dst, m->plen) != m->lm.header.checksum) {
        *why = "payload checksum mismatch";
        return RG_CORRUPT;
    }
    return RG_OK;
}

/* Verify the checksum of a payload that stays in the arena (zero-copy receive). What the receiver
 * reads later is NOT covered: the peer can rewrite the bytes after this check (only a hostile one
 * would; a receiver that needs stable bytes copies them, or uses a sealed region). */
static int cons_check_in_place(const cons_t *c, const inmsg_t *m, const char **why)
{
    if ((m->s.flags & FLAG_CHECKSUM) &&
        crc32_update(0, (const uint8_t *)c->arena + m->pay_off, m->plen) != m->lm.header.checksum) {
        *why = "payload checksum mismatch";
        return RG_CORRUPT;
    }
    return RG_OK;
}

/* Publish an arena release position (a chunk end at or before our FIFO cursor; it never goes
 * back). RELEASE: our reads of the chunks before it happen-before the producer reuses them. */
static inline void cons_publish_released(cons_t *c, uint64_t v)
{
    __atomic_store_n(ring_u64(c->ring, RING_ARENA_RELEASED_OFF), v, __ATOMIC_RELEASE);
}

/* Done with the slot at head, but not (necessarily) with its chunk: the slot goes back to the
 * producer, the FIFO cursor moves past the chunk, arena_released does not move. */
static inline void cons_consume(cons_t *c, const inmsg_t *m)
{
    if (m->has_payload)
        c->released = m->new_released;
    c->head++;
    /* RELEASE: our reads of the slot happen-before the producer reuses it. */
    __atomic_store_n(ring_u64(c->ring, RING_HEAD_OFF), c->head, __ATOMIC_RELEASE);
}

/* Done with the message at head: release its chunk and its slot to the producer. Only for a
 * consumer that holds no chunk (it publishes the FIFO cursor itself). */
static inline void cons_release(cons_t *c, const inmsg_t *m)
{
    if (m->has_payload) {
        c->released = m->new_released;
        cons_publish_released(c, c->released);
    }
    c->head++;
    /* RELEASE: our reads of the slot happen-before the producer reuses it. */
    __atomic_store_n(ring_u64(c->ring, RING_HEAD_OFF), c->head, __ATOMIC_RELEASE);
}

#endif
