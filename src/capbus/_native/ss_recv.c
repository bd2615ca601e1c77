/*
 * _native/ss_recv.c: Receiving: the server's limit checks and automatic refusals (untrusted
 * clients: every value from the ring is checked here), zero-copy payloads, pop/take, and recv /
 * recv_many / poll / poll_armed. HOT; the recv holder runs the scan and wait without the GIL.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Receiving. ------------------------------------------------------------------------------ */

enum { P_EMPTY, P_SKIPPED, P_TURN, P_DELIVERED, P_RETIRE, P_CORRUPT, P_ERROR };

/* Check a popped message against the channel's limits (CTRL_F_ENFORCE is set). LIM_OK takes its
 * tokens from the server-private buckets: the capability's and each limited ancestor's, shared
 * with every other channel pinning them. *shared: an ancestor's bucket refused it (l then holds
 * that ancestor's rate and bandwidth). */
static int ss_enforce(chan_t *ch, const inmsg_t *m, limits_t *l, int *shared)
{
    ctrl_limits(ch->ctrl, l);
    uint64_t now = limits_need_clock(l) || ch->nanc ? coarse_ns() : 0;
    int lim = limits_static(l, now, m->plen);
    if (lim != LIM_OK || (lim = bucket_check(ch->leaf, l, now, m->plen)) != LIM_OK)
        return lim;
    /* Every limited ancestor must have room too; nothing is taken unless all do. */
    for (uint32_t i = 0; i < ch->nanc; i++) {
        lim = bucket_check_rb(&ch->anc[i].c->b, ch->anc[i].rate, ch->anc[i].bw, now, m->plen);
        if (lim != LIM_OK) {
            l->rate = ch->anc[i].rate; /* the limit that refused it, for the error text */
            l->bandwidth = ch->anc[i].bw;
            *shared = 1;
            return lim;
        }
    }
    bucket_take(ch->leaf, l, m->plen);
    for (uint32_t i = 0; i < ch->nanc; i++)
        bucket_take_rb(&ch->anc[i].c->b, ch->anc[i].rate, ch->anc[i].bw, m->plen);
    return LIM_OK;
}

/* The automatic error reply to a call the limits refused: FLAG_ERROR, data[0] = the capbus error
 * code, a short text. Dropped if the response ring is full (a client that does not read its
 * replies has no use for it). */
static int ss_refuse_call(ServerSetObject *S, chan_t *ch, uint64_t tag, int lim,
                          const limits_t *l, int shared, uint64_t plen, const char **why)
{
    char text[LM_INLINE_SIZE * 2];
    uint64_t code = code_invalid_capability;
    switch (lim) {
    case LIM_RIGHTS:
        snprintf(text, sizeof text, "the capability does not carry the right to send");
        break;
    case LIM_EXPIRED:
        snprintf(text, sizeof text, "the capability has expired");
        break;
    case LIM_SIZE:
        code = code_message_too_large;
        snprintf(text, sizeof text, "payload of %llu bytes exceeds the capability's limit of %llu",
                 (unsigned long long)plen, (unsigned long long)l->max_size);
        break;
    case LIM_RATE:
        code = code_rate_limit;
        snprintf(text, sizeof text, "rate limit of %llu messages/s exceeded%s",
                 (unsigned long long)l->rate, shared ? " (a parent capability's)" : "");
        break;
    default:
        code = code_rate_limit;
        snprintf(text, sizeof text, "bandwidth limit of %llu bytes/s exceeded%s",
                 (unsigned long long)l->bandwidth, shared ? " (a parent capability's)" : "");
        break;
    }
    outmsg_t e;
    e.capability = 0;
    e.opcode = 0;
    e.flags = FLAG_ERROR | FLAG_IPC_ERROR;
    e.data[0] = code;
    e.data[1] = e.data[2] = e.data[3] = 0;
    e.tag = tag;
    e.payload = (const uint8_t *)text;
    e.plen = strlen(text);
    if (e.plen > LM_INLINE_SIZE)
        e.flags |= FLAG_LARGE;
    int r = ss_write_reply(S, ch, &e, why, 0); /* recv is active: ch stays valid */
    return r == RG_CORRUPT ? P_CORRUPT : P_TURN;
}

/* The limits for a popped message (CTRL_F_ENFORCE is set). P_DELIVERED: it passes (its tokens
 * are taken). Otherwise it is consumed and refused: not delivered, a call answered with an
 * error, and its turn used up (a client flooding refused messages cannot hold the server on its
 * channel): P_TURN, or P_CORRUPT if the error reply found the response ring scribbled. Out of
 * line: only channels whose capability carries a limit come here, and the others keep a
 * smaller hot path. */
static __attribute__((noinline, cold)) int ss_limits(ServerSetObject *S, chan_t *ch,
                                                     inmsg_t *m, const char **why)
{
    static const unsigned drop_off[LIM_NREASONS] = {
        [LIM_RIGHTS] = SSTATS_DROPS_RIGHTS_OFF, [LIM_EXPIRED] = SSTATS_DROPS_EXPIRED_OFF,
        [LIM_SIZE] = SSTATS_DROPS_SIZE_OFF,     [LIM_RATE] = SSTATS_DROPS_RATE_OFF,
        [LIM_BANDWIDTH] = SSTATS_DROPS_BANDWIDTH_OFF,
    };
    limits_t l;
    int shared = 0;
    int lim = ss_enforce(ch, m, &l, &shared);
    if (lim == LIM_OK)
        return P_DELIVERED;
    ch->drops[lim]++;
    stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, drop_off[lim], 1);
    ch->last_tag = m->s.tag;
    ch_consume(ch, m, 0);
    if ((m->s.flags & FLAG_REPLY_EXPECTED) && !ch->draining && ctrl_state(ch->ctrl) == STATE_OPEN)
        return ss_refuse_call(S, ch, m->s.tag, lim, &l, shared, m->plen, why);
    return P_TURN;
}

/* A zero-copy payload: a read-only view of the arena chunk, whose checksum (if any) is verified
 * in place. NULL with an exception, or with *corrupt_why set and no exception. */
static PyObject *zc_payload(ServerSetObject *S, chan_t *ch, const inmsg_t *m, ZBufObject **E,
                            const char **corrupt_why)
{
    int r;
    if ((m->s.flags & FLAG_CHECKSUM) && m->plen >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = cons_check_in_place(&ch->req, m, corrupt_why);
        Py_END_ALLOW_THREADS
    } else {
        r = cons_check_in_place(&ch->req, m, corrupt_why);
    }
    if (r != RG_OK)
        return NULL;
    return zb_view((PyObject *)S, ch->req.arena + m->pay_off, m->plen, 1, E);
}

/* Pop one request from channel ch (GIL held). */
static HOT int ss_pop(ServerSetObject *S, chan_t *ch, PyObject **out, const char **why)
{
    if (ch->draining) {
        if (ch->req.head == ch->drain_end || ctrl_state(ch->ctrl) == STATE_REVOKED)
            return P_RETIRE;
    } else if (ctrl_state(ch->ctrl) != STATE_OPEN) {
        return P_EMPTY; /* skipped until the kernel removes it (or reopens it) */
    }
    if (__builtin_expect(ch_zq_full(ch), 0)) {
        /* Every consumption may need a queue entry: not served until a release (which clears
         * the flag and kicks us). RELAXED: see ss_full_scan. */
        __atomic_store_n(&ch->zc_blocked, 1, __ATOMIC_RELAXED);
        return P_EMPTY;
    }
    int r = cons_poll(&ch->req, why);
    if (r == RG_EMPTY)
        return ch->draining ? P_RETIRE : P_EMPTY;
    inmsg_t m;
    if (r == RG_CORRUPT || cons_read(&ch->req, &m, why) != RG_OK)
        return P_CORRUPT;
    if (m.s.tag <= ch->last_tag) {
        *why = "request tag did not increase";
        return P_CORRUPT;
    }
    char *sblk = ch->map + CHAN_SSTATS_OFF;
    /* Only calls are cancelled: a client's calls are synchronous, so when the call with tag T
     * timed out every call before it is finished or cancelled too; one-way sends queued before
     * it are still wanted. RELAXED: the mark is a hint about the client's own requests. */
    uint64_t cancel_below =
        __atomic_load_n((uint64_t *)(ch->map + CHAN_CANCEL_BELOW_OFF), __ATOMIC_RELAXED);
    if ((m.s.flags & FLAG_REPLY_EXPECTED) && m.s.tag < cancel_below) {
        ch->last_tag = m.s.tag;
        ch_consume(ch, &m, 0);
        stat_add(sblk, ch->sst, SSTATS_CANCELLED_OFF, 1);
        return P_SKIPPED;
    }
    /* The capability's limits: one predictable branch when the kernel set none. */
    if (__builtin_expect(ctrl_flags(ch->ctrl) & CTRL_F_ENFORCE, 0)) {
        int p = ss_limits(S, ch, &m, why);
        if (p != P_DELIVERED)
            return p;
    }
    /* Allocate everything first: a failure (or a GC run releasing other requests) must find the
     * message unconsumed and the held-chunk queue untouched. */
    PyObject *payload = NULL;
    ZBufObject *E = NULL;
    int zc = m.has_payload && ((m.s.flags & FLAG_LOANED) || m.plen >= ZC_THRESHOLD);
    if (zc) {
        if (!ch->zq && ch_zq_alloc(ch) < 0)
            return P_ERROR;
        *why = NULL;
        payload = zc_payload(S, ch, &m, &E, why);
        if (!payload)
            return *why ? P_CORRUPT : P_ERROR;
    } else if (m.has_payload) {
        *why = NULL;
        payload = take_payload(&ch->req, &m, why);
        if (!payload)
            return *why ? P_CORRUPT : P_ERROR;
    }
    PyObject *opcode_o = u64_object(m.s.opcode);
    RequestObject *R = opcode_o ? request_alloc() : NULL;
    if (!R) {
        Py_XDECREF(opcode_o);
        Py_XDECREF(payload); /* frees E too */
        return P_ERROR; /* not consumed: the next recv gets it again */
    }
    Py_INCREF(S);
    R->set = S;
    R->opcode_o = opcode_o;
    R->payload = payload ? payload : Py_NewRef(empty_bytes);
    R->plen = m.plen;
    R->tag = m.s.tag;
    R->capability = m.s.capability;
    R->sender = ch->sender_id;
    R->serial = ch->serial;
    R->generation = ch->generation;
    memcpy(R->data, m.s.data, sizeof R->data);
    R->index = ch->index;
    R->opcode = m.s.opcode;
    R->flags = m.s.flags;
    int rr = 0;
    R->prio = (int16_t)prio_of(m.s.flags, ch->ctrl, S->prio_lo, S->prio_hi, &rr);
    R->prio_rr = (int8_t)rr;
    ch->last_tag = m.s.tag;
    uint64_t seq = ch_consume(ch, &m, zc);
    if (zc) {
        Py_INCREF(E);
        R->zbuf = E;
        E->ch = ch;
        E->seq = seq;
        E->held = 1;
        ch->views++;
    }
    stat_add(sblk, ch->sst, SSTATS_RECEIVED_OFF, 1);
    if (m.plen)
        stat_add(sblk, ch->sst, SSTATS_BYTES_RECEIVED_OFF, m.plen);
    stat_second(sblk, ch->sst, S->coarse_now, 1);
    *out = (PyObject *)R;
    return P_DELIVERED;
}

enum { TK_ERROR = -1, TK_NONE = 0, TK_GOT = 1, TK_BUDGET = 2 };

/* Take the next message without waiting (GIL and recv_mu held). TK_GOT with *out; TK_NONE when
 * nothing is ready (every ring was looked at, or with will_wait every hint); TK_BUDGET when *budget pops delivered nothing (a
 * client can make its ring flicker, or stream cancelled requests, as fast as we look: the
 * caller re-checks its deadline and signals before going on); TK_ERROR with an exception. With
 * defer, a corrupt channel is recorded for the next call instead of raised. */
static HOT int ss_take(ServerSetObject *S, PyObject **out, int *refreshes, unsigned *budget,
                   int defer, int will_wait)
{
    const char *why = NULL;
    for (;;) {
        S->coarse_now = coarse_ns(); /* also the metrics' clock for what ss_pop delivers */
        if (__atomic_load_n(&S->rescan, __ATOMIC_RELAXED) ||
            S->coarse_now - S->last_full_scan >= FULL_SCAN_NS) {
            __atomic_store_n(&S->rescan, 0, __ATOMIC_RELAXED); /* before the scan: none missed */
            ss_full_scan(S, S->coarse_now);
        }
        if (!*budget)
            return TK_BUDGET;
        int i = ss_pick(S, refreshes, will_wait);
        if (i < 0)
            return TK_NONE;
        (*budget)--;
        chan_t *ch = S->table[i];
        int p = ch ? ss_pop(S, ch, out, &why) : P_EMPTY;
        if (p == P_CORRUPT && ch->draining)
            p = P_RETIRE; /* its index may belong to a new channel: nothing to report */
        switch (p) {
        case P_DELIVERED:
            S->rr = (uint32_t)i + 1;
            return TK_GOT;
        case P_SKIPPED: /* same channel again: a cancelled request does not use up its turn */
            continue;
        case P_TURN:
            S->rr = (uint32_t)i + 1;
            continue;
        case P_EMPTY:
            S->ready[i / 64] &= ~(1ull << (i % 64));
            continue;
        case P_RETIRE:
            S->ready[i / 64] &= ~(1ull << (i % 64));
            ss_unlink(S, ch);
            continue;
        case P_CORRUPT:
            S->ready[i / 64] &= ~(1ull << (i % 64));
            ss_mark_dead(S, ch);
            if (defer) {
                S->pend_corrupt = 1;
                S->pend_index = ch->index;
                S->pend_why = why;
                return TK_NONE;
            }
            raise_corrupt(ch->index, why);
            return TK_ERROR;
        default:
            return TK_ERROR;
        }
    }
}

/* Raise the CorruptChannel a recv_many deferred, or one a reply found (recv_mu held). */
static HOT int ss_raise_pending(ServerSetObject *S)
{
    if (__builtin_expect(S->reports, 0)) {
        for (uint32_t i = 0; i < TABLE_SLOTS; i++) {
            chan_t *ch = S->table[i];
            if (ch && ch->report_why && !ch->reported) {
                ch->reported = 1;
                S->reports--;
                raise_corrupt(ch->index, ch->report_why);
                return -1;
            }
        }
        S->reports = 0; /* removed meanwhile: nothing left to report */
    }
    if (!S->pend_corrupt)
        return 0;
    S->pend_corrupt = 0;
    raise_corrupt(S->pend_index, S->pend_why);
    return -1;
}

/* A message was returned: the event loop is awake, so the doorbell needs no eventfd write. Load
 * first so the shared line is not dirtied per message. RELAXED: a hint (see poll_armed). */
static inline void ss_clear_event(ServerSetObject *S)
{
    uint32_t *ew = (uint32_t *)(S->db + DB_EVENT_WANTED_OFF);
    if (__atomic_load_n(ew, __ATOMIC_RELAXED))
        __atomic_store_n(ew, 0, __ATOMIC_RELAXED);
}

/* recv_mu for a receive (GIL held on entry and exit); -1 if the set was closed meanwhile. */
static HOT int ss_enter(ServerSetObject *S, int wait)
{
    if (!gl_try(&S->recv_mu)) {
        if (!wait)
            return 1;
        gl_acquire(&S->recv_mu);
    }
    if (!S->db) { /* closed while we waited for the lock */
        gl_release(&S->recv_mu);
        PyErr_SetString(PyExc_ValueError, "ServerSet is closed");
        return -1;
    }
    S->recv_active = 1;
    return 0;
}

static HOT void ss_leave(ServerSetObject *S)
{
    S->recv_active = 0;
    gl_release(&S->recv_mu);
    ss_reap(S);
}

/* Wait (per wait mode) until a message is taken or the deadline passes. TK_GOT, TK_NONE (deadline)
 * or TK_ERROR (CorruptChannel, Cancelled, a signal handler's exception). recv_mu held. */
static HOT int ss_take_wait(ServerSetObject *S, PyObject **out, int64_t timeout_ns)
{
    int refreshes = 2;
    unsigned budget = 2 * MAX_CHANNELS;
    uint64_t deadline = deadline_lazy(timeout_ns); /* see "Lazy deadlines" (common.h) */
    int expired = deadline == 0;
    for (;;) {
        /* Load first: the locked exchange only when interrupt() was called. */
        if (__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED) &&
            __atomic_exchange_n(&S->interrupt, 0, __ATOMIC_RELAXED)) {
            PyErr_SetString(Cancelled, "recv interrupted");
            return TK_ERROR;
        }
        /* Before the deadline, nothing found means ss_wait next: its full scan comes after the
         * fence, so the one before it would only repeat it. Once it has passed, this is the last
         * look, with a full scan. */
        int t = ss_take(S, out, &refreshes, &budget, 0, !expired);
        if (t == TK_GOT || t == TK_ERROR)
            return t;
        if (expired)
            return TK_NONE;
        int w;
        Py_BEGIN_ALLOW_THREADS
        w = ss_wait(S, &deadline, timeout_ns);
        Py_END_ALLOW_THREADS
        if (w == W_EXPIRED)
            expired = 1;
        refreshes = 2;
        budget = 2 * MAX_CHANNELS;
        if (w == W_INTERRUPT)
            continue;
        if (PyErr_CheckSignals() < 0)
            return TK_ERROR;
    }
}

static PyObject *ss_recv(ServerSetObject *S, int64_t timeout_ns);

/* recv(timeout_ns=-1) -> Request. Timeout if nothing arrives; CorruptChannel for a bad channel
 * (then call again); Cancelled after interrupt(). */
static PyObject *ServerSet_recv(ServerSetObject *S, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "recv(timeout_ns=-1)");
        return NULL;
    }
    int64_t timeout_ns = -1;
    if (nargs == 1 && to_i64_timeout(args[0], &timeout_ns) < 0)
        return NULL;
    return ss_recv(S, timeout_ns);
}

static HOT PyObject *ss_recv(ServerSetObject *S, int64_t timeout_ns)
{
    if (!ss_usable(S))
        return NULL;
    if (ss_enter(S, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    prio_restore(); /* the last request's priority ends here at the latest */
    if (ss_raise_pending(S) == 0) {
        int t = ss_take_wait(S, &result, timeout_ns);
        if (t == TK_GOT) {
            ss_clear_event(S);
            if (S->prio_adopt) { /* see prio.c */
                RequestObject *R = (RequestObject *)result;
                prio_adopt(R->prio, R->prio_rr);
            }
        } else if (t == TK_NONE) {
            PyErr_SetString(Timeout, "no request arrived within the timeout");
        }
    }
    ss_leave(S);
    return result;
}

/* recv_many(max_n, timeout_ns=-1) -> list of Requests: waits for one, then takes up to max_n
 * in all without waiting, round robin one per channel per turn. [] on timeout. */
static PyObject *ServerSet_recv_many(ServerSetObject *S, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "recv_many(max_n, timeout_ns=-1)");
        return NULL;
    }
    Py_ssize_t max_n = PyLong_AsSsize_t(args[0]);
    if (max_n == -1 && PyErr_Occurred())
        return NULL;
    if (max_n < 1) {
        PyErr_SetString(PyExc_ValueError, "max_n must be >= 1");
        return NULL;
    }
    int64_t timeout_ns = -1;
    if (nargs == 2 && to_i64_timeout(args[1], &timeout_ns) < 0)
        return NULL;
    if (!ss_usable(S))
        return NULL;
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    if (ss_enter(S, 1) < 0) {
        Py_DECREF(list);
        return NULL;
    }
    PyObject *one = NULL;
    prio_restore(); /* recv_many adopts nothing (its requests may ask for different ones) */
    if (ss_raise_pending(S) < 0)
        goto fail;
    int t = ss_take_wait(S, &one, timeout_ns);
    if (t == TK_ERROR)
        goto fail;
    if (t == TK_GOT) {
        int r = PyList_Append(list, one);
        Py_DECREF(one);
        if (r < 0)
            goto fail;
        int refreshes = 1;
        unsigned budget = 2 * MAX_CHANNELS;
        while (PyList_GET_SIZE(list) < max_n) {
            t = ss_take(S, &one, &refreshes, &budget, 1, 0);
            if (t != TK_GOT)
                break;
            r = PyList_Append(list, one);
            Py_DECREF(one);
            if (r < 0)
                break;
        }
        /* Whatever stopped the gathering (nothing more, the budget, a failed allocation -- the
         * message then stays in its ring), the gathered messages are returned; a corrupt channel
         * was recorded for the next call. */
        PyErr_Clear();
        ss_clear_event(S);
    }
    ss_leave(S);
    return list;
fail:
    ss_leave(S);
    Py_DECREF(list);
    return NULL;
}

/* poll() / poll_armed(): take a message without waiting (None if there is none, or if another
 * thread is receiving). Armed: see the API comment. */
static PyObject *ss_poll(ServerSetObject *S, int arm)
{
    if (!ss_usable(S))
        return NULL;
    int e = ss_enter(S, 0);
    if (e < 0)
        return NULL;
    if (e > 0)
        Py_RETURN_NONE; /* another thread is in recv: it takes the messages */
    PyObject *result = NULL;
    int t = TK_ERROR;
    if (ss_raise_pending(S) == 0) {
        int refreshes = 1;
        unsigned budget = 2 * MAX_CHANNELS;
        t = ss_take(S, &result, &refreshes, &budget, 0, 0);
        if (t == TK_NONE && arm) {
            /* Empty the eventfd (a write before this belongs to a message the scan below sees;
             * a stale count would only wake the loop for nothing). Then RELAXED store + SEQ_CST
             * fence + full scan, Dekker with lane_ring_doorbell ("publish; bump seq; fence; load
             * event_wanted"): either the scan sees the client's tail, or the client sees the
             * flag and writes the eventfd. */
            if (S->event_efd >= 0)
                efd_drain(S->event_efd);
            /* An event loop waits on the eventfd: clients must do the whole handshake from now
             * on (a spinning server stops advertising that it spins, for good). */
            __atomic_store_n((uint32_t *)(S->db + DB_SERVER_SPINS_OFF), 0, __ATOMIC_RELAXED);
            __atomic_store_n((uint32_t *)(S->db + DB_EVENT_WANTED_OFF), 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            ss_full_scan(S, coarse_ns());
            refreshes = 0;
            t = ss_take(S, &result, &refreshes, &budget, 0, 0);
        }
        if (t == TK_GOT)
            ss_clear_event(S);
        else if (t == TK_BUDGET && arm && S->event_efd >= 0)
            efd_signal(S->event_efd); /* more to look at: come straight back */
    }
    ss_leave(S);
    if (t == TK_GOT)
        return result;
    if (t == TK_ERROR)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ServerSet_poll(ServerSetObject *S, PyObject *unused) { return ss_poll(S, 0); }
static PyObject *ServerSet_poll_armed(ServerSetObject *S, PyObject *unused)
{
    return ss_poll(S, 1);
}
