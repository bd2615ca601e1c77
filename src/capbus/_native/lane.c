/*
 * _native/lane.c: The Lane type: call_poll, call_wait, cancel, send_many, close, mark, getters,
 * the method table and LaneType. GIL held (call_wait drops it while it sleeps).
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* `tag` must be this lane's latest call (call_start's): else ValueError, -1. */
static int check_call_tag(LaneObject *L, uint64_t tag)
{
    if (tag == 0 || tag != L->call_tag) {
        PyErr_Format(PyExc_ValueError, "tag %llu is not this lane's latest call (%llu)",
                     (unsigned long long)tag, (unsigned long long)L->call_tag);
        return -1;
    }
    return 0;
}

/* The channel left OPEN (state `st`) before the reply for `tag` was seen: a reply published
 * before the change is still delivered (1, *out), else the call is cancelled and the state
 * raised (-1). */
static int reply_or_state(LaneObject *L, uint64_t tag, uint32_t st, PyObject **out)
{
    int r = lane_take_reply(L, tag, out);
    if (r == 0) {
        lane_cancel(L, tag);
        raise_for_state(st, "server");
        r = -1;
    }
    return r;
}

/* The end of call_poll and call_wait: the lane is free again; `r` and `result` as
 * lane_take_reply gave them (0: not there yet, None). */
static PyObject *call_result(LaneObject *L, int r, PyObject *result)
{
    L->busy = 0;
    if (r < 0)
        return NULL;
    if (r == 0)
        Py_RETURN_NONE;
    lane_count_latency(L, now_ns() - L->call_t0);
    return result;
}

/* call_poll(tag, arm=False) -> Message | None: the reply of a call_start, if it is there. */
static PyObject *Lane_call_poll(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"tag", "arm", NULL};
    PyObject *a[2];
    uint64_t tag;
    if (fast_args("call_poll", args, nargs, kwnames, kw, 1, a) < 0 ||
        to_u64(a[0], &tag, "tag") < 0)
        return NULL;
    int arm = a[1] ? PyObject_IsTrue(a[1]) : 0;
    if (arm < 0 || !lane_usable(L))
        return NULL;
    if (check_call_tag(L, tag) < 0)
        return NULL;
    PyObject *result = NULL;
    L->busy = 1; /* take_payload may drop the GIL for a big payload */
    int r = lane_take_reply(L, tag, &result);
    if (r == 0) {
        uint32_t st = lane_state(L);
        if (st != STATE_OPEN) {
            r = reply_or_state(L, tag, st, &result);
        } else if (arm) {
            /* Empty the eventfd first: a write before this belongs to a reply we are about to
             * see below, and a stale count would only wake the event loop for nothing. Then
             * RELAXED store + SEQ_CST fence + re-check, the Dekker half matching the server's
             * "publish; fence; load consumer flags" in ss_write_reply: either the server sees the
             * flag and writes the eventfd, or we see its reply here. */
            if (L->reply_efd >= 0)
                efd_drain(L->reply_efd);
            __atomic_store_n(ring_u32(L->resp.ring, RING_CONSUMER_EVENT_OFF), 1, __ATOMIC_RELAXED);
            L->armed = 1;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            r = lane_take_reply(L, tag, &result);
            if (r == 0 && lane_state(L) != STATE_OPEN) {
                /* The kernel changed the state after our first look: report it now rather than
                 * rely on a wake-up the kernel sends to futex sleepers, not to eventfds. */
                r = reply_or_state(L, tag, lane_state(L), &result);
            }
        }
    }
    return call_result(L, r, result);
}

/* call_wait(tag, timeout_ns) -> Message | None: wait (WITHOUT the GIL, as call() waits: the
 * lane's wait mode) up to timeout_ns for the reply of call_start's `tag`. None if it has not
 * come: the call stays pending (call_poll, call_wait or cancel it later). For a thread that may
 * wait a little but not long (a gateway's network thread waits for a fast service here, and hands
 * a slow one's call to its event loop); the metrics count the round trip as call_poll does. */
static PyObject *Lane_call_wait(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"tag", "timeout_ns", NULL};
    PyObject *a[2];
    uint64_t tag;
    int64_t timeout_ns;
    if (fast_args("call_wait", args, nargs, kwnames, kw, 2, a) < 0 ||
        to_u64(a[0], &tag, "tag") < 0 || to_i64_timeout(a[1], &timeout_ns) < 0)
        return NULL;
    if (!lane_usable(L))
        return NULL;
    if (check_call_tag(L, tag) < 0)
        return NULL;
    PyObject *result = NULL;
    uint64_t deadline = deadline_lazy(timeout_ns);
    int expired = deadline == 0, r;
    L->busy = 1; /* close() from another thread waits for us (it refuses a busy lane) */
    for (;;) {
        r = lane_take_reply(L, tag, &result);
        if (r != 0)
            break;
        uint32_t st = lane_state(L);
        if (st != STATE_OPEN) {
            r = reply_or_state(L, tag, st, &result);
            break;
        }
        if (expired)
            break; /* r == 0: not yet */
        int w;
        Py_BEGIN_ALLOW_THREADS
        w = lane_wait(L, &deadline, timeout_ns);
        Py_END_ALLOW_THREADS
        expired = w == LW_EXPIRED; /* one more look at the ring first */
        if (PyErr_CheckSignals() < 0) {
            r = -1; /* the call stays pending: the caller decides (cancel, or wait again) */
            break;
        }
    }
    return call_result(L, r, result);
}

/* cancel(tag): the call with this tag (and every earlier one) will not be waited for. */
static PyObject *Lane_cancel(LaneObject *L, PyObject *arg)
{
    uint64_t tag;
    if (to_u64(arg, &tag, "tag") < 0 || !lane_usable(L))
        return NULL;
    if (tag > L->last_tag) {
        PyErr_Format(PyExc_ValueError, "tag %llu was never sent (last tag %llu)",
                     (unsigned long long)tag, (unsigned long long)L->last_tag);
        return NULL;
    }
    lane_cancel(L, tag);
    Py_RETURN_NONE;
}

/* want_room(on): say (on=True) or stop saying that this lane's producer waits for room in the
 * request ring or arena. The flag is the head position (low 32 bits, never 0) at which the
 * server is to wake us: half-way through what is outstanding, so that a producer that outruns
 * its consumer is woken once per half ring and then writes that much without waiting, instead
 * of one wake-up per message (a held chunk released wakes us whatever the target). Arming
 * drains the reply eventfd first (a stale count would only wake the waiter for nothing), then
 * store + full fence: the caller's next try to send comes after it, so either that try sees the
 * room the server freed or the server sees the flag (up to the server's unfenced look, see
 * ch_room_freed: the waiter re-checks at least every SLEEP_CAP_NS). */
static PyObject *Lane_want_room(LaneObject *L, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0 || !lane_usable(L))
        return NULL;
    uint32_t *flag = ring_u32(L->req.ring, RING_PRODUCER_WAITING_OFF);
    if (!on) {
        __atomic_store_n(flag, 0, __ATOMIC_RELAXED);
        Py_RETURN_NONE;
    }
    if (L->reply_efd >= 0)
        efd_drain(L->reply_efd);
    /* The consumer's head is only a hint here (a value out of range just moves the target):
     * prod_slots_free validates it for real on the next send. */
    uint64_t h = __atomic_load_n(ring_u64(L->req.ring, RING_HEAD_OFF), __ATOMIC_ACQUIRE);
    if (h < L->req.head_seen || h > L->req.published)
        h = L->req.head_seen;
    uint64_t out = L->req.published - h;
    uint32_t target = (uint32_t)(h + (out > 1 ? out / 2 : 1));
    store_fence_u32(flag, target ? target : 1);
    Py_RETURN_NONE;
}

/* send_many(capability, flags, [(opcode, data[, payload]), ...]) -> accepted count.
 * Every message that could fit is parsed and checked first (nothing is written if one is bad),
 * then they are written in order until the ring, the arena or the rate/bandwidth buckets say
 * stop, and published with one tail store and one doorbell ring. Runs entirely under the GIL. */
static PyObject *Lane_send_many(LaneObject *L, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "send_many(capability, flags, [(opcode, data[, payload]), ...])");
        return NULL;
    }
    if (!lane_usable(L))
        return NULL;
    uint64_t cap;
    uint32_t flags;
    if (to_u64(args[0], &cap, "capability") < 0 || parse_flags(args[1], &flags, prio_stamp()) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "send_many expects a list or tuple of tuples");
    if (!seq)
        return NULL;
    Py_ssize_t total = PySequence_Fast_GET_SIZE(seq), n = total;
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        Py_DECREF(seq);
        return NULL;
    }
    limits_t l;
    uint64_t now = 0;
    int enf = lane_limits_batch(L, &l, &now);
    if (enf < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    const char *why = NULL;
    uint64_t nfree;
    /* Enough room for the whole batch, or for more than one batch can take: either way `full`
     * below is decided as with a fresh head. */
    uint64_t want = (uint64_t)total <= BATCH_MAX ? (uint64_t)total : BATCH_MAX + 1;
    if (prod_slots_free(&L->req, want, &nfree, &why) != RG_OK) {
        lane_break(L, why);
        Py_DECREF(seq);
        return NULL;
    }
    uint64_t room = nfree < BATCH_MAX ? nfree : BATCH_MAX;
    int full = (uint64_t)total > nfree && nfree <= BATCH_MAX; /* the ring cannot take them all */
    if ((uint64_t)n > room)
        n = (Py_ssize_t)room;
    Py_ssize_t parsed = 0, written = 0;
    for (; parsed < n; parsed++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, parsed);
        if (!PyTuple_Check(item) || (PyTuple_GET_SIZE(item) != 2 && PyTuple_GET_SIZE(item) != 3)) {
            PyErr_SetString(PyExc_TypeError,
                            "send_many items are tuples (opcode, data) or (opcode, data, payload)");
            goto fail;
        }
        outmsg_t *m = &L->batch[parsed];
        m->capability = cap;
        m->flags = flags;
        if (to_u32(PyTuple_GET_ITEM(item, 0), &m->opcode, "opcode") < 0 ||
            parse_data(PyTuple_GET_ITEM(item, 1), m->data) < 0)
            goto fail;
        if (parse_payload(PyTuple_GET_SIZE(item) == 3 ? PyTuple_GET_ITEM(item, 2) : Py_None, m,
                          &L->views[parsed], L->max_payload, 0) < 0) {
            if (PyErr_ExceptionMatches(MessageTooLarge))
                lane_stat(L, CSTATS_REFUSED_SIZE_OFF, 1);
            goto fail;
        }
        if (L->loan_active && m->payload) {
            PyErr_SetString(PyExc_RuntimeError,
                            "a loan is out on this lane: commit it (call_loan/send_loan) or "
                            "cancel_loan() before sending another payload");
            parsed++; /* its view is held: release it below */
            goto fail;
        }
        if (enf && l.max_size && m->plen > l.max_size) {
            lane_refuse(L, LIM_SIZE, &l, m->plen, 1);
            parsed++; /* its view is held: release it below */
            goto fail;
        }
    }
    int limited = 0; /* stopped by the rate/bandwidth buckets */
    int lim = LIM_OK;
    uint64_t bytes = 0;
    L->busy = 1;
    for (; written < n; written++) {
        outmsg_t *m = &L->batch[written];
        if (enf && (lim = bucket_check(&L->bucket, &l, now, m->plen)) != LIM_OK) {
            limited = 1;
            break;
        }
        m->tag = L->last_tag + 1;
        prod_res_t res = {0, 0, 0, 0, 0};
        int r = m->payload ? lane_reserve(L, m->plen, &res, &why) : RG_OK;
        if (r == RG_OK)
            prod_write_at(&L->req, m, &res);
        if (r == RG_FULL || r == RG_PINNED) {
            full = 1;
            break;
        }
        if (r == RG_CORRUPT) {
            L->busy = 0;
            lane_break(L, why);
            goto fail;
        }
        if (enf)
            bucket_take(&L->bucket, &l, m->plen);
        bytes += m->plen;
        L->last_tag++;
    }
    L->busy = 0;
    for (Py_ssize_t i = 0; i < parsed; i++)
        release_view(&L->views[i]);
    Py_DECREF(seq);
    if (written) {
        prod_publish(&L->req);
        lane_ring_doorbell(L);
        lane_count_sent(L, (uint64_t)written, bytes, 0, coarse_ns()); /* once per batch */
    }
    if (full && !limited && written < total)
        lane_refused(L, (uint64_t)(total - written));
    if (limited)
        lane_stat(L, CSTATS_REFUSED_RATE_OFF, (uint64_t)(total - written));
    if (limited && written == 0) {
        raise_limit(lim, &l, 0);
        return NULL;
    }
    return PyLong_FromSsize_t(written);
fail:
    for (Py_ssize_t i = 0; i < parsed; i++)
        release_view(&L->views[i]);
    Py_DECREF(seq);
    /* Anything written before a corruption was detected is abandoned with the lane. */
    return NULL;
}

static PyObject *Lane_close(LaneObject *L, PyObject *unused)
{
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Lane is in use by another thread");
        return NULL;
    }
    lane_unmap(L); /* cancels the loan; loan views keep the channel mapped until they go */
    Py_RETURN_NONE;
}

/* mark(state): the runtime's own verdict on this channel (STATE_PEER_DEAD: the server's pidfd
 * said it exited; STATE_CLOSED: given up at a reconnect), for when no kernel will write the
 * control page. Wakes a caller asleep on the reply futex; one asleep in its reply-sleep pipe
 * sees end of file (a dead server) or the watchdog's kick. A mark never goes back to OPEN. */
static PyObject *Lane_mark(LaneObject *L, PyObject *arg)
{
    unsigned long st = PyLong_AsUnsignedLong(arg);
    if (st == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (st != STATE_PEER_DEAD && st != STATE_CLOSED && st != STATE_REVOKED) {
        PyErr_SetString(PyExc_ValueError, "mark(state): STATE_PEER_DEAD, STATE_REVOKED or STATE_CLOSED");
        return NULL;
    }
    uint32_t zero = 0;
    __atomic_compare_exchange_n(&L->local_state, &zero, (uint32_t)st, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    if (L->chan)
        sys_futex_wake((const uint32_t *)ring_u64(L->resp.ring, RING_TAIL_OFF), INT_MAX);
    Py_RETURN_NONE;
}

static PyObject *Lane_get_marked(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLong(__atomic_load_n(&L->local_state, __ATOMIC_RELAXED));
}

static PyObject *Lane_get_index(LaneObject *L, void *c) { return PyLong_FromUnsignedLong(L->index); }
static PyObject *Lane_get_broken(LaneObject *L, void *c) { return PyBool_FromLong(L->broken); }
static PyObject *Lane_get_closed(LaneObject *L, void *c) { return PyBool_FromLong(!L->chan); }
static PyObject *Lane_get_last_tag(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->last_tag);
}
static PyObject *Lane_get_spin_budget(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->spin_cur);
}
static PyObject *Lane_get_max_payload(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->max_payload);
}
static PyObject *Lane_get_refused(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->refused);
}
static PyObject *Lane_get_loaned(LaneObject *L, void *c)
{
    if (!L->loan_active)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(L->loan_len);
}

static PyMethodDef Lane_methods[] = {
    {"call", (PyCFunction)(void (*)(void))Lane_call, METH_FASTCALL | METH_KEYWORDS,
     "call(capability, opcode, flags, data, payload=None, timeout_ns=-1) -> Message\n"
     "(opcode, flags, d0, d1, d2, d3, payload or None)"},
    {"send", (PyCFunction)(void (*)(void))Lane_send, METH_FASTCALL | METH_KEYWORDS,
     "send(capability, opcode, flags, data, payload=None) -> None; WouldBlock if full"},
    {"send_many", (PyCFunction)(void (*)(void))Lane_send_many, METH_FASTCALL,
     "send_many(capability, flags, [(opcode, data[, payload]), ...]) -> int accepted"},
    {"call_start", (PyCFunction)(void (*)(void))Lane_call_start, METH_FASTCALL | METH_KEYWORDS,
     "call_start(capability, opcode, flags, data, payload=None) -> tag; WouldBlock if full"},
    {"call_poll", (PyCFunction)(void (*)(void))Lane_call_poll, METH_FASTCALL | METH_KEYWORDS,
     "call_poll(tag, arm=False) -> Message or None"},
    {"call_wait", (PyCFunction)(void (*)(void))Lane_call_wait, METH_FASTCALL | METH_KEYWORDS,
     "call_wait(tag, timeout_ns) -> Message or None: wait (without the GIL) up to timeout_ns "
     "for call_start's reply; None if it has not come (the call stays pending)"},
    {"want_room", (PyCFunction)Lane_want_room, METH_O,
     "want_room(on): while on, the server writes this lane's reply eventfd whenever it frees "
     "room in the request ring or arena (arming drains it first and fences)"},
    {"cancel", (PyCFunction)Lane_cancel, METH_O,
     "cancel(tag): the call with this tag (and every earlier one) is not waited for any more"},
    {"loan", (PyCFunction)Lane_loan, METH_O,
     "loan(n) -> writable memoryview of n bytes in the request arena (one loan at a time);\n"
     "WouldBlock if the arena is full, MessageTooLarge if n is too big"},
    {"call_loan", (PyCFunction)(void (*)(void))Lane_call_loan, METH_FASTCALL | METH_KEYWORDS,
     "call_loan(capability, opcode, flags, data, timeout_ns=-1) -> Message: the loan is the "
     "payload (no copy)"},
    {"send_loan", (PyCFunction)(void (*)(void))Lane_send_loan, METH_FASTCALL | METH_KEYWORDS,
     "send_loan(capability, opcode, flags, data) -> None: one-way, the loan is the payload; "
     "WouldBlock if the ring is full (the loan stays out)"},
    {"cancel_loan", (PyCFunction)Lane_cancel_loan, METH_NOARGS,
     "cancel_loan(): give the loaned chunk back (its views are released); no-op without a loan"},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "Unmap everything; the Lane is unusable."},
    {"mark", (PyCFunction)Lane_mark, METH_O,
     "mark(state): treat the channel as in `state` (STATE_PEER_DEAD, ...) from now on, whatever "
     "the control page says, and wake a caller waiting for its reply"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"index", (getter)Lane_get_index, NULL, "doorbell index of this channel", NULL},
    {"broken", (getter)Lane_get_broken, NULL, "True after a protocol error", NULL},
    {"closed", (getter)Lane_get_closed, NULL, "True after close()", NULL},
    {"marked", (getter)Lane_get_marked, NULL, "the state mark() set, or 0", NULL},
    {"last_tag", (getter)Lane_get_last_tag, NULL, "tag of the last request sent", NULL},
    {"max_payload", (getter)Lane_get_max_payload, NULL, "largest payload in bytes", NULL},
    {"spin_budget", (getter)Lane_get_spin_budget, NULL,
     "ns the next adaptive wait spins before it sleeps (0: it learned that spinning does not pay)",
     NULL},
    {"refused", (getter)Lane_get_refused, NULL,
     "messages send/send_many/call_start/send_loan/loan refused because the ring or arena was "
     "full", NULL},
    {"loaned", (getter)Lane_get_loaned, NULL, "bytes of the loan that is out, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.Lane",
    .tp_basicsize = sizeof(LaneObject),
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lane(chan_fd, ctrl_fd, doorbell_fd, index, nslots=256, arena_size=128 MiB, "
              "wait_mode=1, spin_ns=50000, bell_event_fd=-1, reply_event_fd=-1, bell_sleep_fd=-1, "
              "reply_sleep_fd=-1): the client end of a channel.",
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
    .tp_init = (initproc)Lane_init,
    .tp_new = Lane_new,
};
