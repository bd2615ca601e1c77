/*
 * _native/lane_setup.c: The Lane's mapping and pins, its type's new/dealloc/init, the
 * usable/broken checks, the doorbell, the adaptive spin budget (what its waits learned), cancel
 * and refused counters. GIL held unless said; HOT functions are on a call.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* Unmap everything; the channel itself stays mapped while loan views live (lane_unpin). */
static void lane_unmap(LaneObject *L)
{
    lane_cancel_loan(L);
    if (L->chan) {
        if (L->pins) {
            L->chan_kept = L->chan;
        } else {
            munmap(L->chan, L->chan_len);
        }
    }
    if (L->ctrl)
        munmap(L->ctrl, CTRL_SIZE);
    if (L->db)
        munmap(L->db, DOORBELL_SIZE);
    L->chan = L->ctrl = L->db = NULL;
    if (L->bell_efd >= 0)
        close(L->bell_efd);
    if (L->reply_efd >= 0)
        close(L->reply_efd);
    if (L->sleep_efd >= 0)
        close(L->sleep_efd);
    if (L->rs_fd >= 0)
        close(L->rs_fd);
    L->bell_efd = L->reply_efd = L->sleep_efd = L->rs_fd = -1;
    PyMem_Free(L->batch);
    PyMem_Free(L->views);
    L->batch = NULL;
    L->views = NULL;
}

/* The last view of a loan buffer of L is gone: its chunk may be allocated again, and the last
 * one of a closed lane unmaps the channel. */
static void lane_unpin(LaneObject *L, ZBufObject *E)
{
    E->lane_pin = 0;
    if (L->loan_buf == E)
        L->loan_buf = NULL; /* the loan is still out: the caller dropped its views */
    if (E->prev)
        E->prev->next = E->next;
    else
        L->bufs = E->next;
    if (E->next)
        E->next->prev = E->prev;
    E->prev = E->next = NULL;
    if (--L->pins == 0 && L->chan_kept) {
        munmap(L->chan_kept, L->chan_len);
        L->chan_kept = NULL;
    }
}

/* Does the arena chunk [off, off + len) overlap a chunk that a loan view of L still shows? */
static int lane_pinned(const LaneObject *L, uint64_t off, uint64_t len)
{
    for (const ZBufObject *E = L->bufs; E; E = E->next)
        if (off < E->coff + E->clen && E->coff < off + len)
            return 1;
    return 0;
}

/* RG_PINNED: the arena has room, but the chunk it offers is still under a loan view of this lane
 * (a committed loan's memory after the receiver let it go, or a cancelled loan's). */
enum { RG_PINNED = 3 };

/* prod_reserve, never over a chunk a loan view still shows (GIL held: the list is the GIL's).
 * One branch while no loan view is alive. When the place prod_reserve picks is pinned, the other
 * places the consumer accepts are tried: the FIFO cursor without the idle jump to offset 0 (so
 * `v = loan(n)` in a loop, the previous view still alive, goes on), then the start of the next
 * lap. */
static HOT int lane_reserve(LaneObject *L, uint64_t plen, prod_res_t *r, const char **why)
{
    int rc = prod_reserve(&L->req, plen, r, why);
    if (__builtin_expect(L->pins == 0, 1) || rc != RG_OK || !lane_pinned(L, r->off, r->len))
        return rc;
    static const int other[] = {RES_NO_JUMP, RES_NO_JUMP | RES_WRAP};
    int full = 0; /* a place not pinned may come free as the receiver releases more */
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++) {
        rc = prod_reserve_at(&L->req, plen, other[i], r, why);
        if (rc == RG_CORRUPT)
            return rc;
        if (rc == RG_OK && !lane_pinned(L, r->off, r->len))
            return RG_OK;
        full |= rc == RG_FULL;
    }
    /* Full but the receiver has released everything: only our own views are in the way. */
    const prod_t *p = &L->req;
    uint64_t rel = (p->rel_seen == p->jump_from && p->jump_to) ? p->jump_to : p->rel_seen;
    return full && rel != p->cursor ? RG_FULL : RG_PINNED;
}

static const char pinned_msg[] =
    "a view of an earlier loan on this lane still shows the arena memory the next payload needs: "
    "drop that view (or copy what you keep of it) and send again";

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    LaneObject *L = (LaneObject *)PyType_GenericNew(type, args, kw);
    if (L)
        L->bell_efd = L->reply_efd = L->sleep_efd = L->rs_fd = -1; /* never close fd 0 */
    return (PyObject *)L;
}

static void Lane_dealloc(LaneObject *L)
{
    lane_unmap(L);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static int Lane_init(LaneObject *L, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"chan_fd",   "ctrl_fd", "doorbell_fd",   "index",
                             "nslots",    "arena_size", "wait_mode",  "spin_ns",
                             "bell_event_fd", "reply_event_fd", "bell_sleep_fd",
                             "reply_sleep_fd", NULL};
    int chan_fd, ctrl_fd, db_fd, mode = WAIT_ADAPTIVE, bell_fd = -1, reply_fd = -1, sleep_fd = -1,
        rs_fd = -1;
    unsigned long long index, nslots = DEFAULT_NSLOTS, asize = DEFAULT_ARENA_SIZE;
    long long spin_ns = DEFAULT_SPIN_NS;
    if (core_registered() < 0)
        return -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiK|KKiLiiii:Lane", kwlist, &chan_fd,
                                     &ctrl_fd, &db_fd, &index, &nslots, &asize, &mode, &spin_ns,
                                     &bell_fd, &reply_fd, &sleep_fd, &rs_fd))
        return -1;
    if (L->chan) {
        PyErr_SetString(PyExc_RuntimeError, "Lane already initialised");
        return -1;
    }
    if (index >= MAX_CHANNELS) {
        PyErr_Format(PyExc_ValueError, "index must be in 0..%u", MAX_CHANNELS - 1);
        return -1;
    }
    if (check_geometry(nslots, asize) < 0 || check_wait(mode, spin_ns) < 0)
        return -1;
    uint64_t len = channel_size(nslots, asize);
    if (L->chan_kept) {
        PyErr_SetString(PyExc_RuntimeError, "Lane already initialised");
        return -1;
    }
    L->chan = map_memfd(chan_fd, len, 1, "channel");
    if (!L->chan)
        return -1;
    L->chan_len = (size_t)len;
    L->ctrl = map_memfd(ctrl_fd, CTRL_SIZE, 0, "control page");
    if (!L->ctrl)
        goto fail;
    L->db = map_memfd(db_fd, DOORBELL_SIZE, 1, "doorbell");
    if (!L->db)
        goto fail;
    if ((L->bell_efd = efd_dup(bell_fd)) == -2 || (L->reply_efd = efd_dup(reply_fd)) == -2 ||
        (L->sleep_efd = sleep_fd_dup(sleep_fd, -1)) == -2 ||
        (L->rs_fd = sleep_fd_dup(rs_fd, 0)) == -2)
        goto fail;
    L->rs_off = 0;
    unsigned nb = nslots < BATCH_MAX ? (unsigned)nslots : BATCH_MAX;
    L->batch = PyMem_Calloc(nb, sizeof *L->batch);
    L->views = PyMem_Calloc(nb, sizeof *L->views);
    if (!L->batch || !L->views) {
        PyErr_NoMemory();
        goto fail;
    }
    L->index = (uint32_t)index;
    L->mode = mode;
    L->spin_ns = L->spin_cur = (uint64_t)spin_ns;
    L->max_payload = max_payload_for(asize);
    memset(&L->req, 0, sizeof L->req);
    memset(&L->resp, 0, sizeof L->resp);
    memset(&L->bucket, 0, sizeof L->bucket);
    L->req.ring = L->chan + REQ_RING_OFF;
    L->req.arena = L->chan + req_arena_off(nslots);
    L->req.nslots = nslots;
    L->req.asize = asize;
    L->resp.ring = L->chan + resp_ring_off(nslots);
    L->resp.arena = L->chan + resp_arena_off(nslots, asize);
    L->resp.nslots = nslots;
    L->resp.asize = asize;
    L->last_tag = L->call_tag = L->cancel_below = L->refused = 0;
    L->busy = L->broken = L->armed = 0;
    L->loan_active = 0;
    L->call_t0 = 0;
    memset(L->cst, 0, sizeof L->cst);
    L->fork_gen = fork_gen;
    L->local_state = 0;
    return 0;
fail:
    if (L->bell_efd == -2)
        L->bell_efd = -1;
    if (L->reply_efd == -2)
        L->reply_efd = -1;
    if (L->sleep_efd == -2)
        L->sleep_efd = -1;
    if (L->rs_fd == -2)
        L->rs_fd = -1;
    lane_unmap(L);
    return -1;
}

static HOT int lane_usable(LaneObject *L)
{
    if (!L->chan) {
        PyErr_SetString(PyExc_ValueError, "Lane is closed");
        return 0;
    }
    if (check_fork(L->fork_gen, "capbus channel") < 0)
        return 0;
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Lane used from two threads at once (one per thread)");
        return 0;
    }
    if (L->broken) {
        PyErr_SetString(ProtocolError, "lane is unusable after a protocol error");
        return 0;
    }
    return 1;
}

static void lane_break(LaneObject *L, const char *why)
{
    L->broken = 1;
    PyErr_Format(ProtocolError, "server wrote garbage into channel %u (%s); the lane is unusable",
                 L->index, why);
}

/* Tell the server there is work: hint bit; then, unless the server spins (it watches the hint
 * bits itself and never sleeps), seq bump, a wake-up only if it sleeps (a write to the sleep
 * eventfd or a futex wake, whichever it sleeps on), and an eventfd write only if an event-loop
 * server asked for one. */
static HOT void lane_ring_doorbell(LaneObject *L)
{
    uint64_t *word = (uint64_t *)(L->db + DB_BITMAP_OFF) + L->index / 64;
    uint32_t *seq = (uint32_t *)(L->db + DB_SEQ_OFF);
    /* RELEASE: a server that sees the bit and then ACQUIRE-loads our tail sees this message (it
     * re-reads the tail before trusting anything: the bit is only a hint). */
    __atomic_fetch_or(word, 1ull << (L->index % 64), __ATOMIC_RELEASE);
#if !defined(__x86_64__) && !defined(__i386__)
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* on x86 the locked RMW above is this fence */
#endif
    /* Dekker with ss_poll(arm), which clears server_spins before it sets event_wanted, fences and
     * scans: either that scan sees our tail, or this load sees 0 and we do the full handshake.
     * A client that scribbles the flag to 1 can make wake-ups go missing, like one that clears
     * server_sleeping: the sleep watchdog / timers bound that. Saves the seq line (which a
     * spinning server reads) and a fence per message. */
    L->woke = 0;
    if (__atomic_load_n((uint32_t *)(L->db + DB_SERVER_SPINS_OFF), __ATOMIC_RELAXED) == 1)
        return;
    /* SEQ_CST (RELEASE would do for this): a server that ACQUIRE-loads seq and sees this
     * increment also sees our tail. Then a full fence, Dekker with the server's "store
     * sleeping=1; fence; load seq; scan" (ss_wait) and with poll_armed's "store event_wanted=1;
     * fence; scan": either the server's scan sees our tail, or our loads below see its flag and
     * we wake it. On x86 the locked add is that fence. Both loads are RELAXED (the fence orders
     * them) and hit one cache line. */
    __atomic_fetch_add(seq, 1, __ATOMIC_SEQ_CST);
#if !CB_X86
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    uint32_t sleeping = __atomic_load_n((uint32_t *)(L->db + DB_SERVER_SLEEPING_OFF),
                                        __ATOMIC_RELAXED);
    L->woke = sleeping != 0; /* (client-writable: a lie only keeps our spins, see lane_spin_lost) */
    if (sleeping == SLEEP_EFD && L->sleep_efd >= 0)
        efd_ring(L->sleep_efd);
    else if (sleeping)
        sys_futex_wake(seq, INT_MAX);
    if (L->bell_efd >= 0 &&
        __atomic_load_n((uint32_t *)(L->db + DB_EVENT_WANTED_OFF), __ATOMIC_RELAXED))
        efd_signal(L->bell_efd);
}

/* An adaptive wait's spin, for the next one (common.h, "Adaptive waiting"): a win doubles it (from
 * 0: the floor), a loss halves it, and SPIN_STOP_AFTER losses in a row at the floor make it 0 --
 * losses while the server was busy with others' calls (queueing). A loss by a request that had to
 * wake the server (L->woke) is that wake-up's latency instead: it keeps the floor, as before, so
 * that a lone caller whose server fell asleep (another load took its CPU for a while) does not
 * stop spinning for good: its spins are what bring both ends back to spinning. */
static inline void lane_spin_won(LaneObject *L)
{
    L->spin_cur = L->spin_cur ? spin_won(L->spin_cur, L->spin_ns)
                              : (SPIN_FLOOR_NS < L->spin_ns ? SPIN_FLOOR_NS : L->spin_ns);
    L->spin_miss = 0;
}

static inline void lane_spin_lost(LaneObject *L)
{
    if (L->spin_cur > SPIN_FLOOR_NS || L->woke) {
        L->spin_cur = spin_lost(L->spin_cur);
        L->spin_miss = 0;
    } else if (++L->spin_miss >= SPIN_STOP_AFTER) {
        L->spin_cur = 0;
    }
}

/* After an adaptive wait that slept with spinning stopped: a reply that came within spin_ns of
 * the wait's start says a spin would have seen it, and one to a request that had to wake the
 * server says nothing about queueing (see above): spin again, from the floor. Only then is the
 * clock read (the sleep cost a syscall already). */
static inline void lane_spin_learn(LaneObject *L, uint64_t start)
{
    if (L->mode == WAIT_ADAPTIVE && !L->spin_cur && L->spin_ns &&
        (L->woke || now_ns() - start < L->spin_ns))
        lane_spin_won(L);
}

/* The client's cancel mark: the server skips requests with tag < cancel_below. It never moves
 * back (that would revive requests cancelled before). RELEASE is not needed for correctness (it
 * is a hint; a skipped or a served request are both fine), but costs nothing on x86 and keeps the
 * store ordered after the request it cancels. */
static void lane_cancel(LaneObject *L, uint64_t tag)
{
    if (tag + 1 <= L->cancel_below)
        return;
    L->cancel_below = tag + 1;
    __atomic_store_n((uint64_t *)(L->chan + CHAN_CANCEL_BELOW_OFF), tag + 1, __ATOMIC_RELEASE);
}

/* Count messages refused for a full ring/arena. RELAXED: an informational counter the server
 * reads without trusting it; no other memory is published with it. */
static void lane_refused(LaneObject *L, uint64_t n)
{
    L->refused += n;
    __atomic_store_n((uint64_t *)(L->chan + CHAN_REFUSED_OFF), L->refused, __ATOMIC_RELAXED);
}
