/*
 * _native/serverset.c: The ServerSet type: reply, interrupt, close,
 * contains/is_dead/refused/drops, getters, the method table and ServerSetType. GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* reply(index, tag, opcode, flags, data, payload=None): never blocks. */
static PyObject *ServerSet_reply(ServerSetObject *S, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 5 || nargs > 6) {
        PyErr_SetString(PyExc_TypeError, "reply(index, tag, opcode, flags, data, payload=None)");
        return NULL;
    }
    if (!ss_usable(S))
        return NULL;
    uint64_t index;
    outmsg_t m;
    m.capability = 0;
    if (to_u64(args[0], &index, "index") < 0 || to_u64(args[1], &m.tag, "tag") < 0 ||
        to_u32(args[2], &m.opcode, "opcode") < 0 || parse_flags(args[3], &m.flags, 0) < 0 ||
        parse_data(args[4], m.data) < 0)
        return NULL;
    chan_t *ch = index < MAX_CHANNELS ? S->table[index] : NULL;
    if (!ch || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED)) {
        if (ch)
            stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
        PyErr_Format(PeerDied, "channel %llu is gone", (unsigned long long)index);
        return NULL;
    }
    uint32_t st = ctrl_state(ch->ctrl);
    if (st != STATE_OPEN) {
        stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
        PyErr_Format(PeerDied, "channel %llu is not open (state %u)", (unsigned long long)index,
                     st);
        return NULL;
    }
    Py_buffer view;
    if (parse_payload(nargs > 5 ? args[5] : Py_None, &m, &view, max_payload_for(ch->resp.asize),
                      0) < 0)
        return NULL;
    const char *why = NULL;
    int r = ss_write_reply(S, ch, &m, &why, 1); /* ch may be gone after this */
    release_view(&view);
    return reply_outcome(r, (uint32_t)index, why);
}

static PyObject *ServerSet_interrupt(ServerSetObject *S, PyObject *unused)
{
    if (!S->db) {
        PyErr_SetString(PyExc_ValueError, "ServerSet is closed");
        return NULL;
    }
    if (S->fork_gen != fork_gen)
        Py_RETURN_NONE; /* a forked child's Service.close(): nothing of it runs here */
    /* RELAXED flag + the wake-up below (the waiter re-reads the flag after waking). */
    __atomic_store_n(&S->interrupt, 1, __ATOMIC_RELAXED);
    ss_wake_sleeper(S);
    Py_RETURN_NONE;
}

static PyObject *ServerSet_close(ServerSetObject *S, PyObject *unused)
{
    if (S->recv_active) {
        PyErr_SetString(PyExc_RuntimeError, "recv() is running in another thread");
        return NULL;
    }
    for (uint32_t i = 0; i < TABLE_SLOTS; i++)
        if (S->table[i] && S->table[i]->users) {
            PyErr_SetString(PyExc_RuntimeError, "reply() is running in another thread");
            return NULL;
        }
    ss_free_all(S);
    Py_RETURN_NONE;
}

static PyObject *ServerSet_contains(ServerSetObject *S, PyObject *arg)
{
    unsigned long long index = PyLong_AsUnsignedLongLong(arg);
    if (index == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(index < MAX_CHANNELS && S->table[index]);
}

static PyObject *ServerSet_is_dead(ServerSetObject *S, PyObject *arg)
{
    chan_t *ch = ss_lookup(S, arg);
    return ch ? PyBool_FromLong(__atomic_load_n(&ch->dead, __ATOMIC_RELAXED)) : NULL;
}

static PyObject *ServerSet_refused(ServerSetObject *S, PyObject *arg)
{
    chan_t *ch = ss_lookup(S, arg);
    if (!ch)
        return NULL;
    /* RELAXED: an informational, client-written number; nothing is read through it. */
    return PyLong_FromUnsignedLongLong(
        __atomic_load_n((uint64_t *)(ch->map + CHAN_REFUSED_OFF), __ATOMIC_RELAXED));
}

static PyObject *ServerSet_drops(ServerSetObject *S, PyObject *arg)
{
    chan_t *ch = ss_lookup(S, arg);
    if (!ch)
        return NULL;
    return Py_BuildValue("{sKsKsKsKsK}", "rate", (unsigned long long)ch->drops[LIM_RATE],
                         "bandwidth", (unsigned long long)ch->drops[LIM_BANDWIDTH], "size",
                         (unsigned long long)ch->drops[LIM_SIZE], "expired",
                         (unsigned long long)ch->drops[LIM_EXPIRED], "rights",
                         (unsigned long long)ch->drops[LIM_RIGHTS]);
}

static Py_ssize_t ServerSet_len(ServerSetObject *S) { return S->nchan; }

static PyObject *ServerSet_get_draining(ServerSetObject *S, void *c)
{
    Py_ssize_t n = 0;
    for (uint32_t w = 0; w < MAX_CHANNELS / 64; w++)
        n += __builtin_popcountll(S->drain_used[w]);
    return PyLong_FromSsize_t(n);
}

/* set_priority(lo, hi, adopt=True): the priorities this service serves at (prio.c). */
static PyObject *ServerSet_set_priority(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"lo", "hi", "adopt", NULL};
    int lo, hi, adopt = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|p:set_priority", kwlist, &lo, &hi, &adopt))
        return NULL;
    if (lo < PRIO_MIN || hi > PRIO_MAX || lo > hi) {
        PyErr_Format(PyExc_ValueError,
                     "priority range (%d, %d): need %d <= lo <= hi <= %d (-nice, or 20 + a "
                     "real-time priority)", lo, hi, PRIO_MIN, PRIO_MAX);
        return NULL;
    }
    S->prio_lo = lo;
    S->prio_hi = hi;
    S->prio_adopt = adopt;
    Py_RETURN_NONE;
}

static PyMethodDef ServerSet_methods[] = {
    {"set_priority", (PyCFunction)(void (*)(void))ServerSet_set_priority,
     METH_VARARGS | METH_KEYWORDS,
     "set_priority(lo, hi, adopt=True): clamp callers' priorities to [lo, hi]; adopt: recv() "
     "runs the receiving thread at the request's priority until reply() or the next recv()"},
    {"add", (PyCFunction)(void (*)(void))ServerSet_add, METH_VARARGS | METH_KEYWORDS,
     "add(index, chan_fd, ctrl_fd, nslots=256, arena_size=128 MiB, sender_id=None, "
     "reply_event_fd=-1, reply_sleep_fd=-1, reply_sleep_keep_fd=-1, generation=0)"},
    {"remove", (PyCFunction)(void (*)(void))ServerSet_remove, METH_VARARGS | METH_KEYWORDS,
     "remove(index, drain=False): drain=True still delivers the requests already in the ring"},
    {"recv", (PyCFunction)(void (*)(void))ServerSet_recv, METH_FASTCALL,
     "recv(timeout_ns=-1) -> Request"},
    {"recv_many", (PyCFunction)(void (*)(void))ServerSet_recv_many, METH_FASTCALL,
     "recv_many(max_n, timeout_ns=-1) -> list of Requests ([] on timeout)"},
    {"poll", (PyCFunction)ServerSet_poll, METH_NOARGS, "poll() -> Request or None (never waits)"},
    {"poll_armed", (PyCFunction)ServerSet_poll_armed, METH_NOARGS,
     "poll_armed() -> Request or None; None means armed: a client's next message writes the "
     "event fd"},
    {"reply", (PyCFunction)(void (*)(void))ServerSet_reply, METH_FASTCALL,
     "reply(index, tag, opcode, flags, data, payload=None)"},
    {"interrupt", (PyCFunction)ServerSet_interrupt, METH_NOARGS,
     "Make the running (or the next) recv raise Cancelled."},
    {"close", (PyCFunction)ServerSet_close, METH_NOARGS, "Unmap every channel and the doorbell."},
    {"is_dead", (PyCFunction)ServerSet_is_dead, METH_O,
     "is_dead(index) -> bool: was the channel found corrupt?"},
    {"refused", (PyCFunction)ServerSet_refused, METH_O,
     "refused(index) -> int: messages the client says it could not queue (untrusted)"},
    {"drops", (PyCFunction)ServerSet_drops, METH_O,
     "drops(index) -> dict(rate, bandwidth, size, expired, rights): messages refused by the "
     "capability's limits"},
    {"__contains__", (PyCFunction)ServerSet_contains, METH_O | METH_COEXIST, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *ServerSet_get_buckets(ServerSetObject *S, void *c)
{
    return PyLong_FromUnsignedLong(S->buckets.n);
}

static PyGetSetDef ServerSet_getset[] = {
    {"draining", (getter)ServerSet_get_draining, NULL, "channels still being drained", NULL},
    {"buckets", (getter)ServerSet_get_buckets, NULL,
     "token buckets held per capability (pinned by channels, or idle until refilled)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int ServerSet_sq_contains(ServerSetObject *S, PyObject *arg)
{
    PyObject *r = ServerSet_contains(S, arg);
    int v = r == Py_True;
    Py_XDECREF(r);
    return v;
}

static PySequenceMethods ServerSet_as_seq = {
    .sq_length = (lenfunc)ServerSet_len,
    .sq_contains = (objobjproc)ServerSet_sq_contains,
};

static PyTypeObject ServerSetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.ServerSet",
    .tp_basicsize = sizeof(ServerSetObject),
    .tp_dealloc = (destructor)ServerSet_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ServerSet(doorbell_fd, wait_mode=1, spin_ns=50000, event_fd=-1, sleep_fd=-1): "
              "the service end.",
    .tp_methods = ServerSet_methods,
    .tp_getset = ServerSet_getset,
    .tp_as_sequence = &ServerSet_as_seq,
    .tp_init = (initproc)ServerSet_init,
    .tp_new = ServerSet_new,
};
