/*
 * _native/lane_loan.c: Loans: payloads written in place in the request arena (loan, cancel_loan,
 * call_loan, send_loan); a loan's views never outlive their memory (lane_pinned). GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Loans: payloads written in place. ------------------------------------------------------ */

/* Give the loaned chunk back (nothing was committed, the cursor never moved: forgetting the
 * reservation is the roll-back). Its views stay valid: while one lives, lane_reserve will not
 * hand that memory out again. No-op without a loan. */
static void lane_cancel_loan(LaneObject *L)
{
    if (!L->loan_active)
        return;
    L->loan_active = 0;
    L->loan_buf = NULL;
}

/* loan(n) -> writable memoryview of exactly n bytes in the request arena. */
static PyObject *Lane_loan(LaneObject *L, PyObject *arg)
{
    uint64_t n;
    if (to_u64(arg, &n, "n") < 0 || !lane_usable(L))
        return NULL;
    if (L->loan_active) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this lane already has a loan out: commit it (call_loan/send_loan) or "
                        "cancel_loan() first");
        return NULL;
    }
    if (n > L->max_payload) {
        lane_stat(L, CSTATS_REFUSED_SIZE_OFF, 1);
        PyErr_Format(MessageTooLarge, "a loan of %llu bytes exceeds the maximum of %llu bytes",
                     (unsigned long long)n, (unsigned long long)L->max_payload);
        return NULL;
    }
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        return NULL;
    }
    if (__builtin_expect(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE, 0)) {
        /* Fail before the caller fills a payload the capability would refuse anyway. */
        limits_t l;
        ctrl_limits(L->ctrl, &l);
        if (l.max_size && n > l.max_size) {
            lane_refuse(L, LIM_SIZE, &l, n, 1);
            return NULL;
        }
    }
    const char *why = NULL;
    prod_res_t res;
    int r = lane_reserve(L, n, &res, &why);
    if (r == RG_CORRUPT) {
        lane_break(L, why);
        return NULL;
    }
    if (r == RG_PINNED) {
        lane_refused(L, 1);
        PyErr_SetString(WouldBlock, pinned_msg);
        return NULL;
    }
    if (r == RG_FULL) {
        lane_refused(L, 1);
        PyErr_SetString(WouldBlock,
                        "the arena for this channel is full: the receiver still holds earlier "
                        "payloads");
        return NULL;
    }
    ZBufObject *E;
    PyObject *mv = zb_view((PyObject *)L, prod_res_payload(&L->req, &res, n), n, 0, &E);
    if (!mv)
        return NULL;
    E->lane_pin = 1;
    E->coff = res.off;
    E->clen = res.len;
    E->next = L->bufs;
    if (L->bufs)
        L->bufs->prev = E;
    L->bufs = E;
    L->pins++;
    L->loan_buf = E;
    L->loan_res = res;
    L->loan_len = n;
    L->loan_active = 1;
    return mv;
}

/* cancel_loan(): give the loaned chunk back (reserved until its views go). No-op without one. */
static PyObject *Lane_cancel_loan(LaneObject *L, PyObject *unused)
{
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Lane used from two threads at once (one per thread)");
        return NULL;
    }
    lane_cancel_loan(L);
    Py_RETURN_NONE;
}

/* Parse and check a loan commit (capability, opcode, flags, data); nothing is written. The loan
 * stays out when this fails. */
static int lane_prepare_loan(LaneObject *L, PyObject *const *a, uint32_t extra, outmsg_t *m,
                             charge_t *c)
{
    if (!lane_usable(L))
        return -1;
    if (to_u64(a[0], &m->capability, "capability") < 0 || to_u32(a[1], &m->opcode, "opcode") < 0 ||
        parse_flags(a[2], &m->flags, extra | FLAG_LOANED | prio_stamp()) < 0 || parse_data(a[3], m->data) < 0)
        return -1;
    if (!L->loan_active) {
        PyErr_SetString(PyExc_RuntimeError, "no loan is out on this lane: call loan(n) first");
        return -1;
    }
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        return -1;
    }
    m->plen = L->loan_len;
    m->payload = (const uint8_t *)prod_res_payload(&L->req, &L->loan_res, m->plen);
    if (m->plen > LM_INLINE_SIZE)
        m->flags |= FLAG_LARGE;
    c->enforce = __builtin_expect(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE, 0) != 0;
    if (c->enforce && lane_check(L, c, m->plen) < 0)
        return -1;
    return 0;
}

/* call_loan(capability, opcode, flags, data, timeout_ns=-1) -> Message */
static PyObject *Lane_call_loan(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"capability", "opcode", "flags", "data", "timeout_ns", NULL};
    PyObject *a[5];
    int64_t timeout_ns;
    if (fast_args("call_loan", args, nargs, kwnames, kw, 4, a) < 0 ||
        to_i64_timeout(a[4], &timeout_ns) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    view.obj = NULL;
    charge_t c;
    if (lane_prepare_loan(L, a, FLAG_REPLY_EXPECTED, &m, &c) < 0)
        return NULL;
    return lane_call_run(L, &m, &view, &c, timeout_ns, 1);
}

/* send_loan(capability, opcode, flags, data) -> None; WouldBlock (the loan stays out) if the
 * request ring is full. */
static PyObject *Lane_send_loan(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"capability", "opcode", "flags", "data", NULL};
    PyObject *a[4];
    if (fast_args("send_loan", args, nargs, kwnames, kw, 4, a) < 0)
        return NULL;
    outmsg_t m;
    charge_t c;
    if (lane_prepare_loan(L, a, 0, &m, &c) < 0)
        return NULL;
    int r = lane_push(L, &m, &c, 1, coarse_ns());
    if (r == RG_OK)
        Py_RETURN_NONE;
    if (r == RG_FULL)
        PyErr_SetString(WouldBlock, "request ring is full (the loan is still out)");
    return NULL;
}
