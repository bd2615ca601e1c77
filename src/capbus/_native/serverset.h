/*
 * _native/serverset.h: chan_t, zent_t and ServerSetObject, the service end; the ServerSet's trust
 * and thread rules are in the section comment below.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_SERVERSET_H
#define CAPBUS_NATIVE_SERVERSET_H

/* =============================================================================================
 * ServerSet: the service end, up to MAX_CHANNELS channels by index.
 *
 * The doorbell is writable by every client, so nothing in it is trusted:
 *   - the ready bitmap is only a hint: bits for indices that are not (alive) channels of this
 *     set are ignored, a set bit on an empty ring costs one tail load, and a cleared bit is
 *     recovered by a full scan of every ring, which runs before every sleep and at least every
 *     FULL_SCAN_NS while busy (the rings are the truth);
 *   - seq only tells a waiting server "look again": a scribbled seq causes spurious scans (bounded
 *     CPU, deadlines still honoured) or a missed wake-up;
 *   - a missed wake-up (server_sleeping scribbled to 0, seq held constant) is bounded by the
 *     SLEEP_CAP_NS cap on every timed futex sleep, and by the sleep watchdog (sleep.c) for the
 *     untimed ones: it costs at most about that much latency, never a hang;
 *   - event_wanted (poll_armed): a client that sets it, or writes the service's eventfd (even
 *     its saturating maximum: honest writes then fail with EAGAIN, and the counter is non-zero
 *     anyway), only causes spurious wake-ups of the event loop (poll_armed then finds nothing,
 *     empties the eventfd and re-arms). A client that CLEARS the flag, or reads the shared
 *     eventfd empty, can make a wake-up go missing: like a cleared server_sleeping, that costs
 *     latency, and an event loop bounds it the same way (it re-polls at least every
 *     SLEEP_CAP_NS while armed).
 *
 * The table has two halves: channel indices 0..MAX_CHANNELS-1, and as many drain slots, where
 * remove(index, drain=True) parks a closed channel while its last requests are delivered (the
 * kernel may hand its index to a new channel at once). Drain slots are found by full scans only.
 *
 * Threads: one recv/poll/recv_many at a time (recv_mu, waited for without the GIL when held).
 * reply() may run in any thread; per channel, replies are serialised by the channel's lock. Both
 * are gil_lock_t: taken only with the GIL, so a free one costs no locked instruction. add(),
 * remove() and the bookkeeping below run under the GIL. recv scans without the GIL, so remove()
 * never unmaps a channel while a recv is running or a reply is using it: it parks the channel on
 * a graveyard list, freed by whoever is last out.
 * ============================================================================================= */

#define TABLE_SLOTS (2 * MAX_CHANNELS)
#define TABLE_WORDS (TABLE_SLOTS / 64)

typedef struct chan {
    char *map;
    size_t map_len;
    char *ctrl;
    uint32_t index;     /* the channel index the kernel gave it */
    uint32_t slot;      /* its place in the table: index, or a drain slot >= MAX_CHANNELS */
    uint64_t serial;    /* unique per add() in this set: a Request names its channel by it */
    uint64_t sender_id;
    uint64_t generation; /* the kernel's name of this channel instance (add(generation=)) */
    cons_t req;         /* consumer of the client's requests (recv thread only) */
    prod_t resp;        /* producer of replies (under lock) */
    uint64_t last_tag;  /* request tags must increase */
    uint64_t drain_end; /* draining: deliver requests below this tail, then retire */
    int draining;       /* atomic: set (GIL) before the channel is published in its drain
                           slot; read by recv, which may be scanning without the GIL */
    int dead;           /* corrupt: never read again (atomic) */
    int removed;        /* GIL */
    const char *report_why; /* a reply found it corrupt (static string; GIL): see ss_defer_report */
    int reported;       /* ... and recv has raised that (GIL) */
    int users;          /* reply() calls using the mapping (GIL) */
    gil_lock_t lock;    /* serialises replies (gl_*) */
    int reply_efd;      /* our duplicate of the client's reply eventfd, or -1 */
    int rs_wfd;         /* the write end of the client's reply-sleep pipe (non-blocking), or -1 */
    int rs_keep;        /* its read end, never read: a write never raises SIGPIPE (or -1) */
    /* Server-private token buckets (recv thread only; see "Buckets per capability" in
     * limits.h): the leaf's (CTRL_CAP_ID_OFF: a shared one, or `own` for id 0) and its
     * limited ancestors', all resolved in add(). Every message is charged to each. */
    bucket_t *leaf;
    cbkt_t *leaf_c;     /* the shared leaf bucket (pinned), or NULL */
    uint32_t nanc;
    struct {
        cbkt_t *c;      /* pinned */
        uint64_t rate, bw;
    } anc[CTRL_CHAIN_MAX];
    bucket_t own;
    uint64_t drops[LIM_NREASONS]; /* refused by the limits, per reason (GIL) */
    struct chan *next_grave;
    /* Zero-copy receive (all GIL). Chunks consumed since the oldest one still held, in FIFO
     * order: each entry is the release position after its chunk, and whether a Request still
     * holds it (consecutive released chunks share an entry). arena_released is published only
     * as the end of the released prefix. zq_cap entries (a power of two, >= 2 * nslots),
     * allocated at the first zero-copy message; when full the channel is not served until a
     * release: a receiver that never releases stalls only this channel. */
    struct zent *zq;
    uint64_t zq_cap, zq_first, zq_next; /* entries [zq_first, zq_next) by sequence number */
    int zc_blocked;     /* atomic: queue full (read by scans without the GIL) */
    int views;          /* live ZBufs of this channel: the mapping stays while > 0 */
    uint64_t sst[SSTATS_SIZE / 8]; /* the server metrics block (private copy; see stat_add) */
    uint32_t room_woken; /* the producer-waiting target we last woke the client for (recv
                            thread; see ch_room_freed). Last: the hot fields keep their lines. */
} chan_t;

typedef struct zent {
    uint64_t end;  /* release position after this entry's chunk(s) */
    uint64_t held; /* a Request (its ZBuf) still holds the chunk */
} zent_t;

typedef struct {
    PyObject_HEAD
    char *db;
    int mode;
    int prio_lo, prio_hi; /* the service's priority range (prio.c; set_priority) */
    int prio_adopt;       /* recv() runs the caller's priority (prio_adopt) */
    uint64_t spin_ns;
    uint64_t spin_cur; /* adaptive: this wait's spin (see spin_won/spin_lost) */
    int recv_active;    /* GIL */
    int interrupt;      /* atomic */
    uint32_t rr;        /* round-robin position (recv only) */
    uint32_t nchan;     /* GIL */
    int event_efd;      /* our duplicate of the service's eventfd, or -1 */
    int sleep_efd;      /* our duplicate of the service's sleep eventfd (blocking), or -1 */
    int efd_off;        /* the sleep eventfd was made non-blocking: futex sleeps only */
    uint64_t last_full_scan;
    /* The sleep watchdog (see wd_*): asleep is 0, or the ticket of the untimed sleep in progress
     * (atomic: the recv thread writes, the watchdog reads); wd_seen is the watchdog's own. */
    uint32_t asleep, sleep_ticket, wd_seen;
    int wd_registered; /* in wd_sets (set by the recv thread, cleared by ss_free_all) */
    unsigned long fork_gen; /* of the process that made it (check_fork) */
    int rescan;           /* atomic: a channel was added (or parked to drain): scan every ring */
    uint64_t next_serial; /* GIL */
    gil_lock_t recv_mu;
    /* A CorruptChannel that recv_many met after it had gathered messages: raised by the next
     * recv/poll/recv_many (recv_mu). pend_why is a static string. */
    int pend_corrupt;
    uint32_t pend_index;
    const char *pend_why;
    uint32_t reports; /* GIL: channels a reply found corrupt, not yet raised (ss_defer_report) */
    chan_t *grave;
    btab_t buckets;     /* GIL: the buckets per capability of every channel, live or parked */
    uint64_t drain_used[MAX_CHANNELS / 64]; /* GIL: drain slots in use */
    uint64_t coarse_now;          /* coarse_ns() of the current receive step (metrics) */
    uint32_t span;                /* atomic: 1 + the highest word of `active` in use (GIL writes) */
    uint64_t active[TABLE_WORDS]; /* alive channels (atomic words; changed under the GIL) */
    uint64_t ready[TABLE_WORDS];  /* recv-private: channels that may have requests */
    chan_t *table[TABLE_SLOTS];   /* atomic pointers */
} ServerSetObject;

#endif /* CAPBUS_NATIVE_SERVERSET_H */
