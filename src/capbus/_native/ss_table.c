/*
 * _native/ss_table.c: The ServerSet's table: freeing and reaping channels, buckets,
 * unlink/wake/kick, the held- chunk queue (zero-copy receive), the type's new/dealloc/init, add
 * and remove. GIL held unless said (ss_reap runs in the recv holder).
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

static void chan_free(chan_t *ch)
{
    if (ch->map)
        munmap(ch->map, ch->map_len);
    if (ch->ctrl)
        munmap(ch->ctrl, CTRL_SIZE);
    if (ch->reply_efd >= 0)
        close(ch->reply_efd);
    if (ch->rs_wfd >= 0)
        close(ch->rs_wfd);
    if (ch->rs_keep >= 0)
        close(ch->rs_keep);
    PyMem_RawFree(ch->zq);
    PyMem_RawFree(ch);
}

/* Resolve the channel's buckets from its control page (GIL held, once, in add()): the leaf's
 * and its chain's, pinned. -1 with MemoryError (nothing pinned). The kernel wrote the fields
 * before handing the page out; a chain longer than CTRL_CHAIN_MAX is cut (the kernel never
 * writes one). */
static int ch_pin_buckets(ServerSetObject *S, chan_t *ch)
{
    uint64_t now = coarse_ns();
    btab_sweep(&S->buckets, now); /* every add and remove sweeps, with limits or without */
    ch->leaf = &ch->own;
    uint64_t id = __atomic_load_n((uint64_t *)(ch->ctrl + CTRL_CAP_ID_OFF), __ATOMIC_RELAXED);
    if (id && !(ch->leaf_c = btab_pin(&S->buckets, id, now)))
        goto oom;
    uint32_t n = __atomic_load_n((uint32_t *)(ch->ctrl + CTRL_CHAIN_LEN_OFF), __ATOMIC_RELAXED);
    n = n < CTRL_CHAIN_MAX ? n : CTRL_CHAIN_MAX;
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t *e =
            (const uint64_t *)(ch->ctrl + CTRL_CHAIN_OFF + i * CTRL_CHAIN_ENTRY_SIZE);
        uint64_t aid = __atomic_load_n(&e[0], __ATOMIC_RELAXED);
        if (!aid || aid == id)
            continue; /* not a bucket of its own: nothing to share */
        cbkt_t *c = btab_pin(&S->buckets, aid, now);
        if (!c)
            goto oom;
        ch->anc[ch->nanc].c = c;
        ch->anc[ch->nanc].rate = __atomic_load_n(&e[1], __ATOMIC_RELAXED);
        ch->anc[ch->nanc].bw = __atomic_load_n(&e[2], __ATOMIC_RELAXED);
        ch->nanc++;
    }
    if (ch->leaf_c)
        ch->leaf = &ch->leaf_c->b;
    return 0;
oom:
    PyErr_NoMemory();
    return -1;
}

/* The channel lets its buckets go (GIL held; idempotent). */
static void ch_unpin_buckets(ServerSetObject *S, chan_t *ch)
{
    uint64_t now = coarse_ns();
    if (ch->leaf_c)
        btab_unpin(&S->buckets, ch->leaf_c, now);
    for (uint32_t i = 0; i < ch->nanc; i++)
        btab_unpin(&S->buckets, ch->anc[i].c, now);
    ch->leaf_c = NULL;
    ch->nanc = 0;
    ch->leaf = &ch->own;
    btab_sweep(&S->buckets, now);
}

/* Free parked channels nobody uses any more (GIL held). */
static HOT void ss_reap(ServerSetObject *S)
{
    if (S->recv_active)
        return;
    chan_t **pp = &S->grave;
    while (*pp) {
        chan_t *ch = *pp;
        if (ch->users == 0 && ch->views == 0) {
            *pp = ch->next_grave;
            ch_unpin_buckets(S, ch);
            chan_free(ch);
        } else {
            pp = &ch->next_grave;
        }
    }
}

/* How many words of the bitmaps the scans look at (GIL held, after any change of `active`):
 * the kernel hands out low indices first and drain slots are rare, so a set with a few channels
 * scans a word or two, not all TABLE_WORDS. RELAXED: a scan that reads a stale span scans a
 * little more, or misses a channel added this instant for that one scan (add() also asks for a
 * rescan, and the full scans before every sleep catch it). */
static void ss_update_span(ServerSetObject *S)
{
    uint32_t w = TABLE_WORDS;
    while (w > 0 && !__atomic_load_n(&S->active[w - 1], __ATOMIC_RELAXED))
        w--;
    __atomic_store_n(&S->span, w, __ATOMIC_RELAXED);
}

static inline uint32_t ss_span(ServerSetObject *S)
{
    return __atomic_load_n(&S->span, __ATOMIC_RELAXED); /* RELAXED: see ss_update_span */
}

/* Take a slot out of the set of alive ones (GIL held). RELEASE: keeps the clear ordered after
 * anything we did to the channel before, for a scanning recv that ACQUIRE-loads the word. */
static void ss_deactivate(ServerSetObject *S, uint32_t slot)
{
    __atomic_fetch_and(&S->active[slot / 64], ~(1ull << (slot % 64)), __ATOMIC_RELEASE);
    ss_update_span(S);
}

static void ss_mark_dead(ServerSetObject *S, chan_t *ch)
{
    /* RELAXED: read by the same threads under the GIL or by recv, which only reads channels
     * through the active bitmap cleared just after. */
    __atomic_store_n(&ch->dead, 1, __ATOMIC_RELAXED);
    ss_deactivate(S, ch->slot);
}

/* A channel found corrupt outside a receive (a reply met a scribbled response ring): the next
 * recv/poll/recv_many raises its CorruptChannel, so the Service reports it to the kernel as it
 * does for garbage met while receiving. The reply itself just fails (returns False): a hostile
 * client cannot make Request.reply raise in a plain `recv(); reply()` loop. */
static void ss_defer_report(ServerSetObject *S, chan_t *ch, const char *why)
{
    if (ch->report_why)
        return;
    ch->report_why = why ? why : "corrupt response ring";
    S->reports++;
}

/* Take a channel out of the table and park it on the graveyard (GIL held); the caller reaps. */
static void ss_unlink(ServerSetObject *S, chan_t *ch)
{
    uint32_t slot = ch->slot;
    ss_deactivate(S, slot);
    /* RELEASE: pairs with the ACQUIRE pointer loads of a scanning recv (which, having the old
     * pointer, is safe: the memory is parked, not unmapped, while it runs). */
    __atomic_store_n(&S->table[slot], NULL, __ATOMIC_RELEASE);
    if (slot >= MAX_CHANNELS) {
        uint32_t j = slot - MAX_CHANNELS;
        S->drain_used[j / 64] &= ~(1ull << (j % 64));
    } else {
        S->nchan--;
    }
    ch->removed = 1;
    ch->next_grave = S->grave;
    S->grave = ch;
}

/* Wake a sleeping recv: seq bump, futex wake, and the sleep eventfd if it sleeps on that. The
 * seq bump is a full fence: a flag the caller stored before (interrupt) is ordered before the
 * load of server_sleeping, and an eventfd sleeper re-reads it after its own fence (ss_wait), so
 * either it sees the flag or we see SLEEP_EFD. */
static void ss_wake_sleeper(ServerSetObject *S)
{
    uint32_t *seq = (uint32_t *)(S->db + DB_SEQ_OFF);
    __atomic_fetch_add(seq, 1, __ATOMIC_SEQ_CST); /* SEQ_CST: as a client's doorbell ring */
    sys_futex_wake(seq, INT_MAX);
    if (S->sleep_efd >= 0 &&
        __atomic_load_n((uint32_t *)(S->db + DB_SERVER_SLEEPING_OFF), __ATOMIC_RELAXED) ==
            SLEEP_EFD)
        efd_ring(S->sleep_efd);
}

/* Make a waiting recv (or event loop) look again: the sleeper's wake-up, and the eventfd. */
static void ss_kick(ServerSetObject *S)
{
    ss_wake_sleeper(S);
    if (S->event_efd >= 0)
        efd_signal(S->event_efd);
}

/* ---- The held-chunk queue (zero-copy receive; see chan_t). GIL held for all of these. ------ */

static int ch_zq_alloc(chan_t *ch)
{
    uint64_t cap = 64;
    while (cap < 2 * ch->req.nslots)
        cap *= 2;
    ch->zq = PyMem_RawMalloc((size_t)cap * sizeof *ch->zq);
    if (!ch->zq) {
        PyErr_NoMemory();
        return -1;
    }
    ch->zq_cap = cap;
    return 0;
}

static inline int ch_zq_full(const chan_t *ch)
{
    return ch->zq_cap && ch->zq_next - ch->zq_first == ch->zq_cap;
}

/* Waking a producer that waits for room (RING_PRODUCER_WAITING_OFF: 0, or the low 32 bits of
 * the request-ring head at which to wake it, which Lane.want_room puts half-way through what is
 * outstanding, so that a waiter is woken once per half ring, not once per message). The value
 * is client-written: any value only makes us write that client's own reply eventfd, at most once
 * per distinct value while we consume (ch->room_woken) and once per held chunk released.
 *
 * After a consumption: a RELAXED load with no fence before it, on the cache line we have just
 * written head to (a full fence per received message would tax every receive for a rare
 * waiter). So the Dekker pair can miss (our load passes our head store in the store buffer while
 * the client stores its flag, fences, and still sees the old head); the waiter is then woken by
 * a later consumption (the target is half-way: more is queued behind it) or by its own re-check,
 * at most SLEEP_CAP_NS later (room.py): bounded latency, never a hang. */
static HOT inline void ch_room_freed(chan_t *ch)
{
    uint32_t t = __atomic_load_n(ring_u32(ch->req.ring, RING_PRODUCER_WAITING_OFF),
                                 __ATOMIC_RELAXED);
    if (__builtin_expect(t == 0, 1))
        return;
    if (t != ch->room_woken && (int32_t)((uint32_t)ch->req.head - t) >= 0 && ch->reply_efd >= 0) {
        ch->room_woken = t;
        efd_signal(ch->reply_efd);
    }
}

/* A held chunk went back (arena room, the head did not move): wake a waiter whatever its
 * target. */
static inline void ch_chunk_freed(const chan_t *ch)
{
    if (__atomic_load_n(ring_u32(ch->req.ring, RING_PRODUCER_WAITING_OFF), __ATOMIC_RELAXED) &&
        ch->reply_efd >= 0)
        efd_signal(ch->reply_efd);
}

/* Consume the message at head (its slot goes back to the client). hold: its chunk stays ours
 * (a zero-copy payload); returns its queue entry. Otherwise the chunk is released: at once when
 * nothing is held (the ordinary path), else behind the held ones. The queue is not full. */
static HOT uint64_t ch_consume(chan_t *ch, const inmsg_t *m, int hold)
{
    if (!hold && (!m->has_payload || ch->zq_first == ch->zq_next)) {
        cons_release(&ch->req, m);
        ch_room_freed(ch);
        return 0;
    }
    uint64_t seq = ch->zq_next, mask = ch->zq_cap - 1;
    zent_t *last = seq != ch->zq_first ? &ch->zq[(seq - 1) & mask] : NULL;
    if (!hold && last && !last->held) {
        last->end = m->new_released;
    } else {
        ch->zq[seq & mask].end = m->new_released;
        ch->zq[seq & mask].held = (uint64_t)hold;
        ch->zq_next++;
    }
    cons_consume(&ch->req, m);
    ch_room_freed(ch);
    return seq;
}

/* A held chunk is released: publish how far the released prefix now reaches, and serve the
 * channel again if the queue was full. */
static void ch_release_chunk(ServerSetObject *S, chan_t *ch, uint64_t seq)
{
    uint64_t mask = ch->zq_cap - 1;
    if (seq - ch->zq_first >= ch->zq_next - ch->zq_first)
        return; /* not in the queue (cannot happen) */
    ch->zq[seq & mask].held = 0;
    if (seq != ch->zq_first)
        return; /* an older chunk is still held: the producer must not reach this one */
    uint64_t v;
    do {
        v = ch->zq[ch->zq_first & mask].end;
        ch->zq_first++;
    } while (ch->zq_first != ch->zq_next && !ch->zq[ch->zq_first & mask].held);
    cons_publish_released(&ch->req, v);
    ch_chunk_freed(ch);
    /* RELAXED: the flag only steers scans; the kick below makes a waiting recv look again. */
    if (__atomic_load_n(&ch->zc_blocked, __ATOMIC_RELAXED)) {
        __atomic_store_n(&ch->zc_blocked, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&S->rescan, 1, __ATOMIC_RELAXED);
        if (S->db)
            ss_kick(S);
    }
}

static void ss_free_all(ServerSetObject *S)
{
    for (uint32_t i = 0; i < TABLE_SLOTS; i++) {
        chan_t *ch = S->table[i];
        if (!ch)
            continue;
        S->table[i] = NULL;
        ch_unpin_buckets(S, ch);
        if (ch->views) { /* payload views still use its mapping: the last one frees it */
            ch->removed = 1;
            ch->next_grave = S->grave;
            S->grave = ch;
        } else {
            chan_free(ch);
        }
    }
    memset(S->active, 0, sizeof S->active);
    memset(S->drain_used, 0, sizeof S->drain_used);
    S->span = 0;
    S->nchan = 0;
    for (chan_t **pp = &S->grave; *pp;) {
        chan_t *ch = *pp;
        ch_unpin_buckets(S, ch); /* before the table goes: a channel kept by views outlives it */
        if (ch->views) {
            pp = &ch->next_grave;
        } else {
            *pp = ch->next_grave;
            chan_free(ch);
        }
    }
    btab_free(&S->buckets);
    wd_forget(S); /* before the doorbell goes: the watchdog wakes through it */
    if (S->db)
        munmap(S->db, DOORBELL_SIZE);
    S->db = NULL;
    if (S->event_efd >= 0)
        close(S->event_efd);
    if (S->sleep_efd >= 0)
        close(S->sleep_efd);
    S->event_efd = S->sleep_efd = -1;
}

static PyObject *ServerSet_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    ServerSetObject *S = (ServerSetObject *)PyType_GenericNew(type, args, kw);
    if (S) {
        S->event_efd = S->sleep_efd = -1; /* never close fd 0 by accident */
        S->prio_lo = PRIO_MIN; /* no range declared: req.priority as the capability allows, */
        S->prio_hi = PRIO_MAX; /* and recv() adopts nothing (Service.set_priority) */
        S->prio_adopt = 0;
    }
    return (PyObject *)S;
}

static void ServerSet_dealloc(ServerSetObject *S)
{
    ss_free_all(S);
    Py_TYPE(S)->tp_free((PyObject *)S);
}

static int ServerSet_init(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"doorbell_fd", "wait_mode", "spin_ns", "event_fd", "sleep_fd", NULL};
    int db_fd, mode = WAIT_ADAPTIVE, event_fd = -1, sleep_fd = -1;
    long long spin_ns = DEFAULT_SPIN_NS;
    if (core_registered() < 0)
        return -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|iLii:ServerSet", kwlist, &db_fd, &mode,
                                     &spin_ns, &event_fd, &sleep_fd))
        return -1;
    if (S->db) {
        PyErr_SetString(PyExc_RuntimeError, "ServerSet already initialised");
        return -1;
    }
    if (check_wait(mode, spin_ns) < 0)
        return -1;
    int efd = efd_dup(event_fd);
    if (efd == -2)
        return -1;
    int sfd = sleep_fd_dup(sleep_fd, -1);
    if (sfd == -2) {
        if (efd >= 0)
            close(efd);
        return -1;
    }
    S->db = map_memfd(db_fd, DOORBELL_SIZE, 1, "doorbell");
    if (!S->db) {
        if (efd >= 0)
            close(efd);
        if (sfd >= 0)
            close(sfd);
        return -1;
    }
    S->event_efd = efd;
    S->sleep_efd = sfd;
    S->efd_off = 0;
    S->fork_gen = fork_gen;
    /* RELAXED: read by clients' doorbell rings; see lane_ring_doorbell and ss_poll. */
    __atomic_store_n((uint32_t *)(S->db + DB_SERVER_SPINS_OFF), mode == WAIT_SPIN, __ATOMIC_RELAXED);
    S->mode = mode;
    S->spin_ns = S->spin_cur = (uint64_t)spin_ns;
    return 0;
}

static HOT int ss_usable(ServerSetObject *S)
{
    if (!S->db) {
        PyErr_SetString(PyExc_ValueError, "ServerSet is closed");
        return 0;
    }
    if (check_fork(S->fork_gen, "capbus service") < 0)
        return 0;
    return 1;
}

/* The live channel at a user-visible index (GIL held), or NULL with KeyError. */
static chan_t *ss_lookup(ServerSetObject *S, PyObject *arg)
{
    unsigned long long index = PyLong_AsUnsignedLongLong(arg);
    if (index == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (index >= MAX_CHANNELS || !S->table[index]) {
        PyErr_Format(PyExc_KeyError, "no channel with index %llu", index);
        return NULL;
    }
    return S->table[index];
}

/* add(index, chan_fd, ctrl_fd, nslots=256, arena_size=128 MiB, sender_id=None,
 *     reply_event_fd=-1, reply_sleep_fd=-1, reply_sleep_keep_fd=-1, generation=0) */
static PyObject *ServerSet_add(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index",     "chan_fd",        "ctrl_fd", "nslots", "arena_size",
                             "sender_id", "reply_event_fd", "reply_sleep_fd",
                             "reply_sleep_keep_fd", "generation", NULL};
    unsigned long long index, nslots = DEFAULT_NSLOTS, asize = DEFAULT_ARENA_SIZE, gen = 0;
    int chan_fd, ctrl_fd, reply_fd = -1, rs_fd = -1, rs_keep = -1;
    PyObject *sender_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Kii|KKOiiiK:add", kwlist, &index, &chan_fd,
                                     &ctrl_fd, &nslots, &asize, &sender_o, &reply_fd, &rs_fd,
                                     &rs_keep, &gen))
        return NULL;
    if (!ss_usable(S))
        return NULL;
    if (index >= MAX_CHANNELS) {
        PyErr_Format(PyExc_ValueError, "index must be in 0..%u", MAX_CHANNELS - 1);
        return NULL;
    }
    if (S->table[index]) {
        PyErr_Format(PyExc_ValueError, "channel index %llu is already in use", index);
        return NULL;
    }
    if (check_geometry(nslots, asize) < 0)
        return NULL;
    uint64_t sender = 0;
    if (sender_o != Py_None && to_u64(sender_o, &sender, "sender_id") < 0)
        return NULL;
    chan_t *ch = PyMem_RawCalloc(1, sizeof *ch);
    if (!ch)
        return PyErr_NoMemory();
    ch->reply_efd = ch->rs_wfd = ch->rs_keep = -1;
    uint64_t len = channel_size(nslots, asize);
    ch->map = map_memfd(chan_fd, len, 1, "channel");
    if (!ch->map)
        goto fail;
    ch->map_len = (size_t)len;
    ch->ctrl = map_memfd(ctrl_fd, CTRL_SIZE, 0, "control page");
    if (!ch->ctrl)
        goto fail;
    if ((ch->reply_efd = efd_dup(reply_fd)) == -2) {
        ch->reply_efd = -1;
        goto fail;
    }
    if ((ch->rs_wfd = sleep_fd_dup(rs_fd, 1)) == -2) {
        ch->rs_wfd = -1;
        goto fail;
    }
    if ((ch->rs_keep = sleep_fd_dup(rs_keep, -1)) == -2) {
        ch->rs_keep = -1;
        goto fail;
    }
    if (ch->rs_wfd >= 0 && ch->rs_keep < 0) { /* no read end of our own: EPIPE could kill us */
        close(ch->rs_wfd);
        ch->rs_wfd = -1;
    }
    if (sender_o == Py_None) /* the kernel wrote it; ACQUIRE is not needed at add() time */
        sender = __atomic_load_n((uint64_t *)(ch->ctrl + CTRL_SENDER_ID_OFF), __ATOMIC_RELAXED);
    ch->index = ch->slot = (uint32_t)index;
    ch->serial = ++S->next_serial;
    ch->sender_id = sender;
    ch->generation = gen;
    ch->req.ring = ch->map + REQ_RING_OFF;
    ch->req.arena = ch->map + req_arena_off(nslots);
    ch->req.nslots = nslots;
    ch->req.asize = asize;
    ch->resp.ring = ch->map + resp_ring_off(nslots);
    ch->resp.arena = ch->map + resp_arena_off(nslots, asize);
    ch->resp.nslots = nslots;
    ch->resp.asize = asize;
    if (ch_pin_buckets(S, ch) < 0) {
        ch_unpin_buckets(S, ch);
        goto fail;
    }
    /* RELEASE (pointer, then bit): a recv scanning without the GIL that ACQUIRE-loads the bit and
     * then the pointer sees a fully initialised chan_t. */
    __atomic_store_n(&S->table[index], ch, __ATOMIC_RELEASE);
    __atomic_fetch_or(&S->active[index / 64], 1ull << (index % 64), __ATOMIC_RELEASE);
    ss_update_span(S);
    S->nchan++;
    /* Requests may be waiting already, and their doorbell hint was dropped while the index was
     * not ours: the next take scans every ring, so the new channel gets its turns at once.
     * RELAXED: read by the recv holder, which then reads the rings with their own ordering. */
    __atomic_store_n(&S->rescan, 1, __ATOMIC_RELAXED);
    /* And wake a recv asleep already: the client's first request may have rung the doorbell
     * before this channel was ours, and the scan that woke found nothing, so without this the
     * request waited for the next wake-up of any kind (the 50 ms sleep cap or the watchdog: a
     * fresh channel's first call took ~51 ms in about one process in ten). The seq bump is a
     * full fence after the table store: a sleeper either scans the new channel or is woken. An
     * event loop's eventfd only if it is armed. */
    ss_wake_sleeper(S);
    if (S->event_efd >= 0 &&
        __atomic_load_n((uint32_t *)(S->db + DB_EVENT_WANTED_OFF), __ATOMIC_RELAXED))
        efd_signal(S->event_efd);
    Py_RETURN_NONE;
fail:
    chan_free(ch);
    return NULL;
}

/* A free drain slot (GIL held), or -1. */
static int ss_drain_slot(ServerSetObject *S)
{
    for (uint32_t w = 0; w < MAX_CHANNELS / 64; w++)
        if (~S->drain_used[w])
            return (int)(w * 64 + (uint32_t)__builtin_ctzll(~S->drain_used[w]));
    return -1;
}

/* remove(index, drain=False) */
static PyObject *ServerSet_remove(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index", "drain", NULL};
    PyObject *index_o;
    int drain = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p:remove", kwlist, &index_o, &drain))
        return NULL;
    chan_t *ch = ss_lookup(S, index_o);
    if (!ch)
        return NULL;
    /* Drain: the requests already in the ring (up to the tail we see now: a client that is still
     * alive cannot extend the drain) are delivered, then the channel goes. Never for a revoked
     * capability or a corrupt channel. head and tail_seen are only changed by recv under the GIL,
     * so they are stable here. */
    if (drain && !__atomic_load_n(&ch->dead, __ATOMIC_RELAXED) &&
        ctrl_state(ch->ctrl) != STATE_REVOKED) {
        /* ACQUIRE: as in cons_poll (the slots before this tail are written). */
        uint64_t t = __atomic_load_n(ring_u64(ch->req.ring, RING_TAIL_OFF), __ATOMIC_ACQUIRE);
        int j = ss_drain_slot(S);
        if (t >= ch->req.tail_seen && t - ch->req.head <= ch->req.nslots && t != ch->req.head &&
            j >= 0) {
            uint32_t index = ch->index, slot = MAX_CHANNELS + (uint32_t)j;
            ss_deactivate(S, index);
            __atomic_store_n(&S->table[index], NULL, __ATOMIC_RELEASE); /* as in ss_unlink */
            S->nchan--;
            /* RELAXED: a scan holding the pointer from the old slot may read it meanwhile (it
             * then marks the channel ready: harmless); the RELEASE below publishes it with the
             * new slot. */
            __atomic_store_n(&ch->draining, 1, __ATOMIC_RELAXED);
            ch->drain_end = t;
            ch->slot = slot;
            S->drain_used[j / 64] |= 1ull << (j % 64);
            /* RELEASE (pointer, then bit), as in add(). */
            __atomic_store_n(&S->table[slot], ch, __ATOMIC_RELEASE);
            __atomic_fetch_or(&S->active[slot / 64], 1ull << (slot % 64), __ATOMIC_RELEASE);
            ss_update_span(S);
            __atomic_store_n(&S->rescan, 1, __ATOMIC_RELAXED); /* drain slots have no hints */
            ss_kick(S);
            Py_RETURN_NONE;
        }
    }
    ss_unlink(S, ch);
    ss_reap(S); /* not while payload views of the channel live: the last one unmaps it */
    Py_RETURN_NONE;
}
