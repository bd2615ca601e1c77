/*
 * _native/lane_io.c: The Lane's call path: client metrics, limit checks, prepare, sleep/wait for a
 * reply, take it, write a request, call_run, and Lane.call / send / call_start. HOT: a round trip
 * runs here.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Client metrics (the CSTATS block; see stat_add for why plain stores suffice). --------- */

static inline void lane_stat(LaneObject *L, unsigned off, uint64_t k)
{
    stat_add(L->chan + CHAN_CSTATS_OFF, L->cst, off, k);
}

/* n messages, `calls` of them calls, carrying `bytes` payload bytes, were published at `now`
 * (CLOCK_MONOTONIC, coarse or not). */
static inline void lane_count_sent(LaneObject *L, uint64_t n, uint64_t bytes, uint64_t calls,
                                   uint64_t now)
{
    char *blk = L->chan + CHAN_CSTATS_OFF;
    stat_add(blk, L->cst, CSTATS_SENT_OFF, n);
    if (bytes)
        stat_add(blk, L->cst, CSTATS_BYTES_SENT_OFF, bytes);
    if (calls)
        stat_add(blk, L->cst, CSTATS_CALLS_OFF, calls);
    stat_second(blk, L->cst, now, n);
    prio_tick(now);
}

/* A call's reply arrived `ns` after the call was started. */
static inline void lane_count_latency(LaneObject *L, uint64_t ns)
{
    char *blk = L->chan + CHAN_CSTATS_OFF;
    if (ns > L->cst[CSTATS_LATENCY_MAX_OFF / 8]) {
        L->cst[CSTATS_LATENCY_MAX_OFF / 8] = ns;
        stat_store(blk, L->cst, CSTATS_LATENCY_MAX_OFF);
    }
    stat_add(blk, L->cst, CSTATS_LATENCY_SUM_OFF, ns);
    stat_add(blk, L->cst, CSTATS_LATENCY_COUNT_OFF, 1);
    stat_add(blk, L->cst, CSTATS_HIST_OFF + 8u * stat_hist_bucket(ns), 1);
}

/* ---- Client-side limit checks (fail fast; the server enforces the same on its side). ------- */

static int raise_limit(int lim, const limits_t *l, uint64_t plen)
{
    if (lim == LIM_RIGHTS)
        PyErr_SetString(PermissionDenied, "this capability does not carry the right to send");
    else if (lim == LIM_EXPIRED)
        PyErr_SetString(InvalidCapability, "the capability has expired");
    else if (lim == LIM_SIZE)
        PyErr_Format(MessageTooLarge,
                     "payload of %llu bytes exceeds this capability's limit of %llu bytes",
                     (unsigned long long)plen, (unsigned long long)l->max_size);
    else if (lim == LIM_RATE)
        PyErr_Format(RateLimitExceeded, "rate limit of %llu messages/s exceeded",
                     (unsigned long long)l->rate);
    else
        PyErr_Format(RateLimitExceeded, "bandwidth limit of %llu bytes/s exceeded",
                     (unsigned long long)l->bandwidth);
    return -1;
}

/* raise_limit, counted in the client metrics (refused_perm / _size / _rate). */
static int lane_refuse(LaneObject *L, int lim, const limits_t *l, uint64_t plen, uint64_t n)
{
    unsigned off = lim == LIM_SIZE                          ? CSTATS_REFUSED_SIZE_OFF
                   : (lim == LIM_RATE || lim == LIM_BANDWIDTH) ? CSTATS_REFUSED_RATE_OFF
                                                            : CSTATS_REFUSED_PERM_OFF;
    lane_stat(L, off, n);
    return raise_limit(lim, l, plen);
}

/* What a prepared message owes the client's buckets once it is written. */
typedef struct {
    int enforce;  /* CTRL_F_ENFORCE was set: bucket_take(l) after the write */
    uint64_t now; /* coarse_ns() of the check */
    limits_t l;
} charge_t;

/* Every client-side check for one message of `plen` payload bytes, in the order rights,
 * expiry, size, rate, bandwidth (CTRL_F_ENFORCE is set). 0: it may go, and c->l / c->now are
 * what bucket_take charges after the write; -1 with PermissionDenied, InvalidCapability,
 * MessageTooLarge or RateLimitExceeded. Out of line and "cold": only channels whose capability
 * carries a limit come here, and the others keep a smaller, denser hot path (measured: with the
 * checks inline the unlimited round trip got slower; this way it costs nothing measurable). */
static __attribute__((noinline, cold)) int lane_check(LaneObject *L, charge_t *c, uint64_t plen)
{
    ctrl_limits(L->ctrl, &c->l);
    c->now = limits_need_clock(&c->l) ? coarse_ns() : 0;
    int lim = limits_static(&c->l, c->now, plen);
    if (lim == LIM_OK)
        lim = bucket_check(&L->bucket, &c->l, c->now, plen);
    return lim == LIM_OK ? 0 : lane_refuse(L, lim, &c->l, plen, 1);
}

/* send_many's first step: 0 (no checks), 1 (*l and *now set: sizes and buckets are checked per
 * message), or -1 with PermissionDenied / InvalidCapability. */
static int lane_limits_batch(LaneObject *L, limits_t *l, uint64_t *now)
{
    if (__builtin_expect(!(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE), 1))
        return 0;
    ctrl_limits(L->ctrl, l);
    *now = limits_need_clock(l) ? coarse_ns() : 0;
    int lim = limits_static(l, *now, 0);
    return lim == LIM_OK ? 1 : lane_refuse(L, lim, l, 0, 1);
}

/* Parse and check one outgoing message (call, call_start, send); nothing is written. On success
 * the payload view is held in *view (release_view), and *c says what to charge the buckets
 * after the write. (Six arguments: all of them travel in registers.) */
static HOT int lane_prepare(LaneObject *L, PyObject *const *a, uint32_t extra, outmsg_t *m,
                        Py_buffer *view, charge_t *c)
{
    /* a = capability (NULL: m->capability is set already), opcode, flags, data, payload (NULL =
     * none) */
    view->obj = NULL;
    if (!lane_usable(L))
        return -1;
    if ((a[0] && to_u64(a[0], &m->capability, "capability") < 0) ||
        to_u32(a[1], &m->opcode, "opcode") < 0 ||
        parse_flags(a[2], &m->flags, extra | prio_stamp()) < 0 || parse_data(a[3], m->data) < 0)
        return -1;
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        return -1;
    }
    if (parse_payload(a[4] ? a[4] : Py_None, m, view, L->max_payload, 0) < 0) {
        if (PyErr_ExceptionMatches(MessageTooLarge))
            lane_stat(L, CSTATS_REFUSED_SIZE_OFF, 1);
        return -1;
    }
    if (__builtin_expect(L->loan_active, 0) && m->payload) {
        release_view(view);
        PyErr_SetString(PyExc_RuntimeError,
                        "a loan is out on this lane: commit it (call_loan/send_loan) or "
                        "cancel_loan() before sending another payload");
        return -1;
    }
    /* The capability's limits: one predictable branch when the kernel set none. */
    c->enforce = __builtin_expect(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE, 0) != 0;
    if (c->enforce && lane_check(L, c, m->plen) < 0) {
        release_view(view);
        return -1;
    }
    return 0;
}

enum { LW_READY, LW_STATE, LW_SLICE, LW_AGAIN, LW_EXPIRED };
enum { LS_TIMED, LS_FOREVER, LS_FAR }; /* lane_sleep's `how` */

/* One sleep until the response ring's tail moves: LW_READY / LW_STATE if there is no need to
 * sleep, LW_SLICE after a signal (or a kick), else LW_AGAIN. `how`: LS_FOREVER, untimed (the
 * pipe, else the futex); LS_FAR, a deadline more than DEADLINE_FAR_NS away (the pipe, whose
 * sleep the watchdog's kick ends within ~2 ticks, else a futex sleep of at most rel_ns);
 * LS_TIMED, a futex sleep of at most rel_ns. */
static HOT int lane_sleep(LaneObject *L, uint64_t *tail, uint32_t *sleeping, uint64_t head,
                      uint64_t rel_ns, int how)
{
    /* An untimed sleep reads the reply-sleep pipe (see "Sleep eventfds and kicks": cheaper than
     * a futex), under a kick: the server can reopen its end for reading and steal the byte. */
    kick_slot_t *k = NULL;
    int piped = how != LS_TIMED && L->rs_fd >= 0 && !L->rs_off && (k = kick_mine()) != NULL;
    /* Store + full fence (store_fence_u32) + re-check: the Dekker half matching the server's
     * "store tail; fence; load sleeping" in ss_write_reply. Either the server sees our flag
     * and wakes us, or we see its tail here and do not sleep. */
    store_fence_u32(sleeping, piped ? SLEEP_EFD : SLEEP_FUTEX);
    uint64_t t = __atomic_load_n(tail, __ATOMIC_RELAXED);
    uint32_t st = lane_state(L);
    if (t != head || st != STATE_OPEN) {
        __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
        return t != head ? LW_READY : LW_STATE;
    }
    if (piped) {
        /* A byte wakes us; more than one (a wake-up we did not need) just ends the next sleep
         * early. End of file: every write end is closed (the server is gone or dropped the
         * channel; the control page will say so), so from now on the futex, which the kernel
         * wakes after any change of the control page. */
        char buf[64];
        uint32_t tk = kick_arm(k);
        ssize_t n = read(L->rs_fd, buf, sizeof buf);
        int e = n < 0 ? errno : 0;
        kick_disarm(k, tk);
        __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
        if (n == 0 || (n < 0 && e != EINTR))
            L->rs_off = 1;
        return e == EINTR ? LW_SLICE : LW_AGAIN;
    }
    /* The futex word is the low 32 bits of the u64 tail (little-endian). A new reply changes
     * it, so FUTEX_WAIT either sees the change (EAGAIN) or is woken by the server. The kernel
     * wakes this same word after changing the control page (_kernel/shm.py, set_state). */
    int r = sys_futex_wait((const uint32_t *)tail, (uint32_t)t, rel_ns, how == LS_FOREVER);
    /* RELAXED: the flag only saves the server a syscall; a stale 1 costs one spurious wake. */
    __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
    return r == -EINTR ? LW_SLICE : LW_AGAIN; /* EINTR: let the caller run signal handlers */
}

/* Wait (WITHOUT the GIL) until something is in the response ring, the control page leaves OPEN,
 * or the slice (<= SLICE_NS, <= deadline) is over; LW_EXPIRED if the deadline had passed. *dl:
 * the deadline, fixed here if DEADLINE_UNSET (see "Lazy deadlines"). */
static HOT int lane_wait(LaneObject *L, uint64_t *dl, int64_t timeout_ns)
{
    uint64_t *tail = ring_u64(L->resp.ring, RING_TAIL_OFF);
    uint32_t *sleeping = ring_u32(L->resp.ring, RING_CONSUMER_SLEEPING_OFF);
    uint64_t head = L->resp.head;
    uint64_t deadline = *dl;
    /* No deadline and no spin: sleep until woken, without reading the clock or arming a timer
     * (a timed FUTEX_WAIT costs ~0.2 us more per sleep on this kind of VM). Nothing is lost by
     * that: a reply wakes this word (ss_write_reply), so does the kernel after any change of the
     * control page (peer dead, revoked, closed), and a signal interrupts the wait (EINTR). */
    int forever = deadline == UINT64_MAX && L->mode != WAIT_SPIN;
    if (forever && L->mode == WAIT_BLOCK)
        return lane_sleep(L, tail, sleeping, head, 0, LS_FOREVER);
    uint64_t start = now_ns();
    deadline = deadline_fix(dl, timeout_ns, start);
    if (start >= deadline)
        return LW_EXPIRED;
    /* A far deadline sleeps as no deadline does (see "Lazy deadlines"). */
    int far = !forever && L->mode != WAIT_SPIN && deadline - start > DEADLINE_FAR_NS;
    if (far && L->mode == WAIT_BLOCK)
        return lane_sleep(L, tail, sleeping, head, SLEEP_CAP_NS, LS_FAR);
    uint64_t slice_end = deadline - start > SLICE_NS ? start + SLICE_NS : deadline;
    uint64_t spin_end = start;
    if (L->mode == WAIT_SPIN)
        spin_end = slice_end;
    else if (L->mode == WAIT_ADAPTIVE && spin_allowed(start))
        spin_end = slice_end - start > L->spin_cur ? start + L->spin_cur : slice_end;
    if (spin_end > start) {
        for (unsigned i = 1;; i++) {
            /* RELAXED: only an "anything new?" test; cons_poll re-reads the tail with ACQUIRE. */
            if (__atomic_load_n(tail, __ATOMIC_RELAXED) != head) {
                if (L->mode == WAIT_ADAPTIVE)
                    lane_spin_won(L);
                return LW_READY;
            }
            if (lane_state(L) != STATE_OPEN)
                return LW_STATE;
            cpu_relax();
            if (i % SPIN_CLOCK_EVERY == 0 && now_ns() >= spin_end)
                break;
        }
        if (L->mode == WAIT_ADAPTIVE)
            lane_spin_lost(L);
    }
    if (forever || far) { /* adaptive, spun out (or not spinning) */
        int r = forever ? lane_sleep(L, tail, sleeping, head, 0, LS_FOREVER)
                        : lane_sleep(L, tail, sleeping, head, SLEEP_CAP_NS, LS_FAR);
        if (r == LW_AGAIN || r == LW_READY)
            lane_spin_learn(L, start);
        return r;
    }
    for (;;) {
        uint64_t now = now_ns();
        if (now >= slice_end)
            return LW_SLICE;
        uint64_t rel = slice_end - now < SLEEP_CAP_NS ? slice_end - now : SLEEP_CAP_NS;
        int r = lane_sleep(L, tail, sleeping, head, rel, LS_TIMED);
        if (r == LW_READY)
            lane_spin_learn(L, start);
        if (r != LW_AGAIN)
            return r;
    }
}

/* Consume the response ring up to the reply for `tag`. Returns 1 with *out = a Message, 0 if
 * the ring is empty (or after a bounded number of late replies), -1 with an exception. */
static HOT int lane_take_reply(LaneObject *L, uint64_t tag, PyObject **out)
{
    const char *why = NULL;
    /* Bounded: a hostile server could produce late replies as fast as we drop them. */
    for (uint64_t n = 0; n <= L->resp.nslots; n++) {
        int r = cons_poll(&L->resp, &why);
        if (r == RG_EMPTY)
            return 0;
        inmsg_t m;
        if (r == RG_CORRUPT || cons_read(&L->resp, &m, &why) != RG_OK)
            goto corrupt;
        if (m.s.tag > tag) {
            why = "reply for a request that was never sent";
            goto corrupt;
        }
        if (m.s.tag < tag) { /* late reply of a cancelled call: drop it, free its chunk */
            cons_release(&L->resp, &m);
            continue;
        }
        PyObject *payload = Py_None;
        Py_INCREF(payload);
        if (m.has_payload) {
            Py_DECREF(payload);
            why = NULL;
            payload = take_payload(&L->resp, &m, &why);
            if (!payload) {
                if (why)
                    goto corrupt;
                return -1;
            }
        }
        PyObject *t = make_message(&m.s, payload);
        if (!t)
            return -1; /* the reply stays in the ring */
        cons_release(&L->resp, &m);
        if (L->armed) {
            /* RELAXED: our own flag; a stale 1 seen by the server costs one spurious write. */
            __atomic_store_n(ring_u32(L->resp.ring, RING_CONSUMER_EVENT_OFF), 0, __ATOMIC_RELAXED);
            L->armed = 0;
        }
        *out = t;
        return 1;
    }
    return 0;
corrupt:
    lane_break(L, why);
    return -1;
}

/* Write one message into the request ring, copying big payloads without the GIL. With `loan`,
 * the payload is the lane's loaned chunk (m->payload points into it): only the LargeMessage
 * struct and the slot are written (plus the CRC, without the GIL when big), and the loan ends;
 * its views stay valid (and keep its chunk from being allocated again). The chunk is reserved
 * with the GIL held (lane_reserve reads the loan views), the copy runs without it: only this
 * lane's own thread adds loan views, so none can appear meanwhile. */
static HOT int lane_write(LaneObject *L, const outmsg_t *m, int loan, const char **why)
{
    int r = RG_OK;
    prod_res_t res = {0, 0, 0, 0, 0};
    if (loan) {
        if ((m->flags & FLAG_CHECKSUM) && m->plen >= NOGIL_COPY_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            prod_write_at(&L->req, m, &L->loan_res);
            Py_END_ALLOW_THREADS
        } else {
            prod_write_at(&L->req, m, &L->loan_res);
        }
        L->loan_active = 0;
        L->loan_buf = NULL; /* its views stay valid (and keep the mapping and the chunk) */
    } else if (m->payload) {
        r = lane_reserve(L, m->plen, &res, why);
        if (r == RG_OK && m->plen >= NOGIL_COPY_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            prod_write_at(&L->req, m, &res);
            Py_END_ALLOW_THREADS
        } else if (r == RG_OK) {
            prod_write_at(&L->req, m, &res);
        }
    } else {
        prod_write_at(&L->req, m, &res);
    }
    return r;
}

static const char *const call_kw[] = {"capability", "opcode",     "flags", "data",
                                      "payload",    "timeout_ns", NULL};
static const char *const send_kw[] = {"capability", "opcode", "flags", "data", "payload", NULL};

/* The body of call() and call_loan(): write (waiting for room), publish, wait for the reply. */
static HOT PyObject *lane_call_run(LaneObject *L, outmsg_t *m, Py_buffer *view, const charge_t *c,
                               int64_t timeout_ns, int loan)
{
    /* The round trip for the metrics (lat_*); CLOCK_MONOTONIC only for a timeout. */
    lat_t t0 = lat_start();
    uint64_t deadline = deadline_lazy(timeout_ns); /* see "Lazy deadlines" */
    uint64_t tag = L->last_tag + 1;
    m->tag = tag;
    const char *why = NULL;
    PyObject *result = NULL;
    uint32_t st;
    L->busy = 1;

    /* 1. Room in the request ring and arena. The server never wakes producers, so poll with
     * short sleeps (10 us doubling to 1 ms) until the deadline. (A loan has its arena chunk.) */
    long backoff_ns = 10000;
    for (;;) {
        uint64_t nfree;
        if (prod_slots_free(&L->req, 1, &nfree, &why) != RG_OK) {
            lane_break(L, why);
            goto out;
        }
        if (nfree > 0) {
            int r = lane_write(L, m, loan, &why);
            if (r == RG_OK)
                break;
            if (r == RG_CORRUPT) {
                lane_break(L, why);
                goto out;
            }
            if (r == RG_PINNED) { /* waiting would not help: this thread holds the view */
                lane_refused(L, 1);
                PyErr_SetString(WouldBlock, pinned_msg);
                goto out;
            }
        }
        st = lane_state(L);
        if (st != STATE_OPEN) {
            raise_for_state(st, "server");
            goto out;
        }
        if (deadline_fix(&deadline, timeout_ns, now_ns()) <= now_ns()) {
            lane_stat(L, CSTATS_TIMEOUTS_OFF, 1);
            PyErr_SetString(Timeout, "timed out waiting for room in the request ring (the server is "
                                     "not reading): nothing was sent");
            goto out;
        }
        struct timespec ts = {0, backoff_ns};
        Py_BEGIN_ALLOW_THREADS
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
        if (backoff_ns < 1000000)
            backoff_ns *= 2;
        if (PyErr_CheckSignals() < 0)
            goto out;
    }
    release_view(view);
    if (c->enforce)
        bucket_take(&L->bucket, &c->l, m->plen);
    L->last_tag = L->call_tag = tag;
    prod_publish(&L->req);
    lane_ring_doorbell(L);
    lane_count_sent(L, 1, m->plen, 1, coarse_ns());

    /* 2. The reply. */
    int expired = deadline == 0;
    for (;;) {
        int r = lane_take_reply(L, tag, &result);
        if (r != 0)
            goto got;
        st = lane_state(L);
        if (st != STATE_OPEN) {
            /* A reply published before the state change is still delivered. */
            r = lane_take_reply(L, tag, &result);
            if (r != 0)
                goto got;
            lane_cancel(L, tag);
            raise_for_state(st, "server");
            goto out;
        }
        if (expired) {
            lane_cancel(L, tag);
            lane_stat(L, CSTATS_TIMEOUTS_OFF, 1);
            char secs[32]; /* PyErr_Format has no %g: timeouts print in seconds, as given */
            snprintf(secs, sizeof secs, "%.6g", (double)timeout_ns / 1e9);
            PyErr_Format(Timeout, "no reply within %s s (the call is cancelled: a late reply is "
                         "dropped); give a longer timeout if the service is only slow", secs);
            goto out;
        }
        int w;
        Py_BEGIN_ALLOW_THREADS
        w = lane_wait(L, &deadline, timeout_ns);
        Py_END_ALLOW_THREADS
        expired = w == LW_EXPIRED; /* one more look at the ring first, then Timeout */
        if (PyErr_CheckSignals() < 0) {
            lane_cancel(L, tag);
            goto out;
        }
    }
got:
    if (result)
        lane_count_latency(L, lat_elapsed(&t0));
out:
    release_view(view);
    L->busy = 0;
    return result;
}

/* call(capability, opcode, flags, data, payload=None, timeout_ns=-1) -> Message */
static PyObject *Lane_call(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *a[6];
    int64_t timeout_ns;
    if (fast_args("call", args, nargs, kwnames, call_kw, 4, a) < 0 ||
        to_i64_timeout(a[5], &timeout_ns) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    if (lane_prepare(L, a, FLAG_REPLY_EXPECTED, &m, &view, &c) < 0)
        return NULL;
    return lane_call_run(L, &m, &view, &c, timeout_ns, 0);
}

/* Push one prepared message without waiting: RG_OK (published, doorbell rung, counted as sent
 * at `now`), RG_FULL / RG_PINNED (refused, counted) or -1 with an exception (the lane is
 * broken). */
static int lane_push(LaneObject *L, outmsg_t *m, const charge_t *c, int loan, uint64_t now)
{
    const char *why = NULL;
    uint64_t nfree;
    m->tag = L->last_tag + 1;
    L->busy = 1;
    int r = prod_slots_free(&L->req, 1, &nfree, &why);
    if (r == RG_OK && nfree == 0)
        r = RG_FULL;
    if (r == RG_OK)
        r = lane_write(L, m, loan, &why);
    L->busy = 0;
    if (r == RG_OK) {
        if (c->enforce)
            bucket_take(&L->bucket, &c->l, m->plen);
        L->last_tag = m->tag;
        prod_publish(&L->req);
        lane_ring_doorbell(L);
        lane_count_sent(L, 1, m->plen, (m->flags & FLAG_REPLY_EXPECTED) != 0, now);
        return RG_OK;
    }
    if (r == RG_FULL || r == RG_PINNED) {
        lane_refused(L, 1);
        return r;
    }
    lane_break(L, why);
    return -1;
}

/* Push a prepared one-way message: None, WouldBlock (refused, counted), or the lane's error. */
static PyObject *lane_send_prepared(LaneObject *L, outmsg_t *m, Py_buffer *view, const charge_t *c)
{
    int r = lane_push(L, m, c, 0, coarse_ns());
    release_view(view);
    if (r == RG_OK)
        Py_RETURN_NONE;
    if (r == RG_FULL)
        PyErr_SetString(WouldBlock, "request ring or arena is full");
    else if (r == RG_PINNED)
        PyErr_SetString(WouldBlock, pinned_msg);
    return NULL;
}

/* send(capability, opcode, flags, data, payload=None): one-way, never blocks. */
static PyObject *Lane_send(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *a[5];
    if (fast_args("send", args, nargs, kwnames, send_kw, 4, a) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    if (lane_prepare(L, a, 0, &m, &view, &c) < 0)
        return NULL;
    return lane_send_prepared(L, &m, &view, &c);
}

/* call_start(capability, opcode, flags, data, payload=None) -> tag: a call that does not wait. */
static PyObject *Lane_call_start(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    PyObject *a[5];
    if (fast_args("call_start", args, nargs, kwnames, send_kw, 4, a) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    if (lane_prepare(L, a, FLAG_REPLY_EXPECTED, &m, &view, &c) < 0)
        return NULL;
    uint64_t t0 = now_ns();
    int r = lane_push(L, &m, &c, 0, t0);
    release_view(&view);
    if (r == RG_OK) {
        L->call_tag = m.tag;
        L->call_t0 = t0;
        return PyLong_FromUnsignedLongLong(m.tag);
    }
    if (r == RG_FULL)
        PyErr_SetString(WouldBlock, "request ring or arena is full");
    else if (r == RG_PINNED)
        PyErr_SetString(WouldBlock, pinned_msg);
    return NULL;
}
