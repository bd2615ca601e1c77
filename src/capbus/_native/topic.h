/*
 * _native/topic.h: Engine (no Python API): a topic's shared layout (the same numbers as
 * capbus/_topic_layout.py, which the kernel uses; tests/core/test_core_topic.py compares them)
 * and the entry words. Any thread; the GIL is held by every caller here (topic_pub.c,
 * topic_sub.c). Nothing here trusts what it reads: the callers check.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_TOPIC_H
#define CAPBUS_NATIVE_TOPIC_H

#define TP_POOL_PUBLISHED_OFF 8
#define TP_POOL_HEADER 4096

#define TP_R_HEAD_OFF 0
#define TP_R_WAKE_OFF 8
#define TP_R_PUB_WAITING_OFF 12
#define TP_R_REL_TAIL_OFF 16
#define TP_R_DELIVERED_OFF 24
#define TP_R_SLEEPING_OFF 64
#define TP_R_PUB_WAKE_OFF 68
#define TP_R_REL_HEAD_OFF 72
#define TP_R_TAKEN_OFF 80
#define TP_R_DROPPED_OFF 88
#define TP_R_ENTRIES_OFF 128
#define TP_ENTRY_SIZE 64

#define TP_ST_WRITTEN 1u
#define TP_ST_TAKEN 2u
#define TP_ST_BUSY 3u

/* One delivery entry: the state word (ring seq * 4 + kind) first, then what it carries. */
typedef struct {
    uint64_t state;
    uint32_t slot, length, opcode, flags;
    uint64_t data[4];
    uint64_t seq;
} tp_entry_t;

_Static_assert(sizeof(tp_entry_t) == TP_ENTRY_SIZE, "a topic entry is 64 bytes");

static inline uint64_t *tp_u64(char *base, size_t off) { return (uint64_t *)(base + off); }
static inline uint32_t *tp_u32(char *base, size_t off) { return (uint32_t *)(base + off); }
/* A forked child's copy of a TopicPub/TopicSub must not touch the parent's rings. */
static inline int tp_forked(unsigned long gen, const char *what)
{
    if (__builtin_expect(gen == fork_gen, 1))
        return 0;
    PyErr_Format(KernelUnavailable ? KernelUnavailable : PyExc_RuntimeError,
                 "this %s belongs to the parent process; a forked child must call "
                 "capbus.connect() for its own connection", what);
    return -1;
}

static inline tp_entry_t *tp_entry(char *ring, uint64_t i)
{
    return (tp_entry_t *)(ring + TP_R_ENTRIES_OFF + i * TP_ENTRY_SIZE);
}

/* A subscriber's data path (topic_sub.c); here because its samples (topic_sample.c, included
 * before it) give their slots back to it. */
typedef struct {
    PyObject_HEAD
    Py_buffer rb;      /* the ring, held writable */
    Py_buffer pb;      /* the pool, held read-only: samples point into it */
    char *ring;
    uint64_t slots, depth, slot_size, max_size, relcap, rel_off, publisher;
    uint64_t next, head_seen, last_seq, rel_head, taken, dropped, gap;
    uint64_t half_seq, half_since; /* entry half_seq - 1 seen half-written since (ns) */
    uint32_t max_held, held; /* samples handed out whose slot is not back yet */
    uint32_t nfreed;
    uint32_t *freed;   /* slots whose sample is released and viewless: to give back */
    unsigned long gen; /* fork_gen when made: a forked child's copy takes and gives back
                        * nothing (fork_gen, not getpid(): that is a system call) */
    int stuck;         /* the publisher stopped taking releases back */
    PyObject *pending; /* what the publisher got wrong, found by take_many() behind samples it
                        * returned: the next take() or take_many() reports it */
} TopicSubObject;

#endif /* CAPBUS_NATIVE_TOPIC_H */
