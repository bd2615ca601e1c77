/*
 * _native/lane.h: LaneObject, the client end of one channel (its fields, lane_state), and the
 * forward declaration lane_cancel_loan needs. The Lane's rules are in the section comment below.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_LANE_H
#define CAPBUS_NATIVE_LANE_H

/* =============================================================================================
 * Lane: the client end of one channel.
 *
 * One Lane per channel memfd and per thread: it owns the request ring's producer side and the
 * response ring's consumer side. Concurrent use from two threads raises RuntimeError. The
 * channel must be fresh (all rings at zero) when the Lane is created.
 * ============================================================================================= */

typedef struct {
    PyObject_HEAD
    char *chan;
    size_t chan_len;
    char *ctrl;
    char *db;
    uint32_t index;
    int mode;
    uint64_t spin_ns;
    uint64_t spin_cur; /* adaptive: this wait's spin, 0 for none (see lane_spin_learn) */
    uint32_t spin_miss; /* adaptive: spins lost in a row at the floor */
    int woke;           /* the last request had to wake the server (lane_ring_doorbell) */
    uint64_t max_payload;
    prod_t req;
    cons_t resp;
    uint64_t last_tag;    /* tags are 1, 2, 3, ... per lane (calls and sends alike) */
    uint64_t call_tag;    /* tag of the latest call (call or call_start) */
    uint64_t cancel_below; /* last value stored to CHAN_CANCEL_BELOW_OFF (never goes back) */
    uint64_t refused;     /* messages refused for a full ring/arena; mirrored to CHAN_REFUSED_OFF */
    int bell_efd;         /* our duplicate of the service's eventfd, or -1 */
    int sleep_efd;        /* our duplicate of the service's sleep eventfd, or -1 */
    int rs_fd;            /* the read end of our reply-sleep pipe (blocking), or -1 */
    int rs_off;           /* that pipe is at end of file: futex sleeps from now on */
    int reply_efd;        /* our duplicate of this channel's reply eventfd, or -1 */
    int armed;            /* we set the response ring's consumer-event flag */
    int busy;
    int broken;
    bucket_t bucket;      /* client-private rate/bandwidth buckets */
    outmsg_t *batch;      /* send_many scratch, allocated once at init */
    Py_buffer *views;
    /* The loan (at most one): a reserved request-arena chunk the user writes in place. */
    int loan_active;
    uint64_t loan_len;    /* payload bytes */
    prod_res_t loan_res;
    ZBufObject *loan_buf; /* borrowed: the loan's buffer while it has views (a buffer holds its
                             Lane, so a strong reference here would be a cycle); the loan itself
                             stays out after its views are dropped */
    ZBufObject *bufs;     /* every loan buffer of this lane with views alive (lane_reserve never
                             allocates over their chunks) */
    int pins;             /* how many: the channel stays mapped while > 0 */
    char *chan_kept;      /* closed, but still mapped for loan views */
    uint64_t call_t0;     /* CLOCK_MONOTONIC at the latest call_start (round-trip counter) */
    uint64_t cst[CSTATS_SIZE / 8]; /* the client metrics block (private copy; see stat_add) */
    unsigned long fork_gen;        /* of the process that made it (check_fork) */
    /* 0, or a STATE_* the runtime set itself (Lane.mark): with the kernel gone nobody writes the
     * control page any more, so the runtime's own pidfd watch says "peer dead" here. */
    uint32_t local_state;
} LaneObject;

/* The channel's state: the kernel's control page, unless it still says OPEN and the runtime
 * marked the lane itself. RELAXED: a mark is a hint set from another thread; the waits re-read
 * it after every wake-up. */
static inline uint32_t lane_state(const LaneObject *L)
{
    uint32_t st = ctrl_state(L->ctrl);
    if (__builtin_expect(st == STATE_OPEN, 1)) {
        uint32_t m = __atomic_load_n(&L->local_state, __ATOMIC_RELAXED);
        if (__builtin_expect(m != 0, 0))
            return m;
    }
    return st;
}

static void lane_cancel_loan(LaneObject *L);

#endif /* CAPBUS_NATIVE_LANE_H */
