/*
 * _native/topic_pub.c: TopicPub, the publisher's data path of a topic: slots, the publisher's
 * PRIVATE count of what each subscriber holds, delivery into every subscription ring, taking
 * back releases and unclaimed entries. The Python Publisher (_runtime/topic.py) owns one and
 * calls it under its lock; GIL held throughout (no blocking call here: waiting for room in
 * block mode is Python's, on the ring's futex word).
 * Trust: the rings are written by subscribers, each possibly hostile: every value read from one
 * (its release ring, its head, an entry's state) is checked against our own counts, and a
 * subscriber that breaks a rule is cut off (listed by take_cuts(); Python tells the kernel).
 * Nothing a subscriber writes can make us touch memory outside our buffers or another
 * subscriber's accounting. Hot path: publish() and deliver().
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

#define TP_MAX_PORTS 64

typedef struct {
    int used;
    int cut;
    uint32_t index;
    Py_buffer rb;      /* the ring, held */
    char *ring;
    uint64_t depth, relcap, rel_off, head, rel_tail, nrefs, bound;
    int32_t *placed;   /* slot behind each entry, as we wrote it (-1: none) */
    uint32_t *refs;    /* slot -> references this subscriber holds */
    int event_fd;
    int dirty;         /* placed entries whose wake-up check is deferred (a batch) */
    char reason[160];
} tp_port_t;

typedef struct {
    PyObject_HEAD
    Py_buffer pb;      /* the pool, held writable */
    char *pool;
    uint32_t slots;
    uint64_t slot_size;
    uint32_t max_held;
    uint32_t *refs;    /* every reference to each slot */
    uint32_t *free_;   /* free slots (a stack) */
    uint32_t nfree;
    uint32_t hist_n, hist_len, hist_at;
    tp_entry_t *hist;  /* the last hist_n samples (state unused), oldest at hist_at */
    uint64_t seq;
    tp_port_t ports[TP_MAX_PORTS];
    int ncut;
    unsigned long gen; /* fork_gen when made (tp_forked) */
    int block;         /* overflow="block": publish() answers False while a subscriber is full */
    uint64_t max_size; /* the topic's: a larger payload is refused (subscribers check it too) */
} TopicPubObject;

static PyTypeObject TopicPubType;

static inline void tp_unref(TopicPubObject *P, uint32_t slot)
{
    if (--P->refs[slot] == 0)
        P->free_[P->nfree++] = slot;
}

static void tp_port_free(TopicPubObject *P, tp_port_t *p)
{
    if (!p->used)
        return;
    for (uint32_t s = 0; s < P->slots; s++)
        while (p->refs[s]) {
            p->refs[s]--;
            tp_unref(P, s);
        }
    PyMem_Free(p->refs);
    PyMem_Free(p->placed);
    PyBuffer_Release(&p->rb);
    p->refs = NULL;
    p->placed = NULL;
    p->used = 0;
}

/* A rule broken: the subscriber loses everything it held (and only it). */
static void tp_cut(TopicPubObject *P, tp_port_t *p, const char *why)
{
    if (p->cut)
        return;
    p->cut = 1;
    P->ncut++;
    snprintf(p->reason, sizeof p->reason, "%s", why);
    for (uint32_t s = 0; s < P->slots; s++)
        while (p->refs[s]) {
            p->refs[s]--;
            tp_unref(P, s);
        }
    p->nrefs = 0;
}

/* The subscriber gives back one reference to slot (a release, or an entry it never claimed). */
static inline int tp_port_drop(TopicPubObject *P, tp_port_t *p, uint64_t slot, const char *what)
{
    if (slot >= P->slots || p->refs[slot] == 0) {
        char why[160];
        snprintf(why, sizeof why, "%s slot %llu, which it does not hold", what,
                 (unsigned long long)slot);
        tp_cut(P, p, why);
        return -1;
    }
    p->refs[slot]--;
    p->nrefs--;
    tp_unref(P, (uint32_t)slot);
    return 0;
}

static void tp_collect(TopicPubObject *P, tp_port_t *p)
{
    char *ring = p->ring;
    uint64_t head = __atomic_load_n(tp_u64(ring, TP_R_REL_HEAD_OFF), __ATOMIC_ACQUIRE);
    uint64_t tail = p->rel_tail;
    if (head == tail)
        return;
    if (head < tail || head - tail > p->relcap) {
        tp_cut(P, p, "its release ring's head is out of range");
        return;
    }
    while (tail != head) {
        uint32_t slot = __atomic_load_n(tp_u32(ring, p->rel_off + (tail % p->relcap) * 4),
                                        __ATOMIC_RELAXED);
        tail++;
        if (tp_port_drop(P, p, slot, "released") < 0)
            return;
    }
    p->rel_tail = tail;
    __atomic_store_n(tp_u64(ring, TP_R_REL_TAIL_OFF), tail, __ATOMIC_RELEASE);
}

/* Wake the subscriber if it sleeps. The head was stored before, then a full fence, then the
 * sleeping flag is read: the Dekker pair with the subscriber (it stores its flag, fences, then
 * reads the head), so one of us sees the other. */
static inline void tp_wake(tp_port_t *p)
{
    char *ring = p->ring;
    uint32_t sleeping = __atomic_load_n(tp_u32(ring, TP_R_SLEEPING_OFF), __ATOMIC_SEQ_CST);
    if (sleeping) {
        __atomic_add_fetch(tp_u32(ring, TP_R_WAKE_OFF), 1, __ATOMIC_SEQ_CST);
        sys_futex_wake(tp_u32(ring, TP_R_WAKE_OFF), INT_MAX);
        if (sleeping == 2 && p->event_fd >= 0) {
            uint64_t one = 1;
            ssize_t w = write(p->event_fd, &one, sizeof one); /* EAGAIN: it is awake already */
            (void)w;
        }
    }
}

/* defer: a batch; the head is stored with release only and the wake-up check is left to
 * tp_wake_dirty() at the end of the batch (one fence and at most one wake per subscriber). */
static void tp_place(TopicPubObject *P, tp_port_t *p, uint32_t slot, uint32_t n, uint32_t opcode,
                     const uint64_t *data, uint64_t seq, int defer)
{
    char *ring = p->ring;
    uint64_t s = p->head, i = s % p->depth;
    tp_entry_t *e = tp_entry(ring, i);
    int32_t old = p->placed[i];
    if (old >= 0) {
        /* Never claimed: we take the reference back (the subscriber counts the gap). Claimed,
         * or scribbled on: the subscriber holds it until it releases it. */
        uint64_t want = (s - p->depth) * 4 + TP_ST_WRITTEN;
        if (__atomic_compare_exchange_n(&e->state, &want, s * 4 + TP_ST_BUSY, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            if (tp_port_drop(P, p, (uint32_t)old, "released before claiming") < 0)
                return;
        } else
            __atomic_store_n(&e->state, s * 4 + TP_ST_BUSY, __ATOMIC_SEQ_CST);
    }
    if (p->nrefs >= p->bound) {
        tp_collect(P, p); /* a batch collects once: what it released since may be waiting */
        if (p->cut)
            return;
    }
    if (p->nrefs >= p->bound) {
        tp_cut(P, p, "it holds more samples than its depth and max_held");
        return;
    }
    e->slot = slot;
    e->length = n;
    e->opcode = opcode;
    e->flags = 0;
    memcpy(e->data, data, sizeof e->data);
    e->seq = seq;
    __atomic_store_n(&e->state, s * 4 + TP_ST_WRITTEN, __ATOMIC_RELEASE);
    p->placed[i] = (int32_t)slot;
    p->refs[slot]++;
    p->nrefs++;
    P->refs[slot]++;
    p->head = s + 1;
    __atomic_store_n(tp_u64(ring, TP_R_DELIVERED_OFF), s + 1, __ATOMIC_RELAXED);
    if (defer) {
        __atomic_store_n(tp_u64(ring, TP_R_HEAD_OFF), s + 1, __ATOMIC_RELEASE);
        p->dirty = 1;
        return;
    }
#if CB_X86
    __atomic_exchange_n(tp_u64(ring, TP_R_HEAD_OFF), s + 1, __ATOMIC_SEQ_CST);
#else
    __atomic_store_n(tp_u64(ring, TP_R_HEAD_OFF), s + 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    tp_wake(p);
}

static uint64_t tp_deliver(TopicPubObject *P, uint32_t slot, uint32_t n, uint32_t opcode,
                           const uint64_t *data, int defer)
{
    uint64_t seq = ++P->seq;
    for (int k = 0; k < TP_MAX_PORTS; k++) {
        tp_port_t *p = &P->ports[k];
        if (p->used && !p->cut)
            tp_place(P, p, slot, n, opcode, data, seq, defer);
    }
    if (P->hist_n) {
        tp_entry_t *h;
        if (P->hist_len == P->hist_n) {
            h = &P->hist[P->hist_at];
            P->hist_at = (P->hist_at + 1) % P->hist_n;
            tp_unref(P, h->slot);
        } else
            h = &P->hist[(P->hist_at + P->hist_len++) % P->hist_n];
        h->slot = slot;
        h->length = n;
        h->opcode = opcode;
        memcpy(h->data, data, sizeof h->data);
        h->seq = seq;
        P->refs[slot]++;
    }
    __atomic_store_n(tp_u64(P->pool, TP_POOL_PUBLISHED_OFF), seq, __ATOMIC_RELAXED);
    return seq;
}

/* A free slot, after taking back what subscribers released; -1 if none (Python says why). */
static int64_t tp_alloc(TopicPubObject *P)
{
    for (int k = 0; k < TP_MAX_PORTS; k++)
        if (P->ports[k].used && !P->ports[k].cut)
            tp_collect(P, &P->ports[k]);
    while (!P->nfree) {
        /* The pool has a slot for every reference that may live at once: only a subscriber over
         * its bounds can be the cause. Cut off whoever holds the most. */
        tp_port_t *worst = NULL;
        for (int k = 0; k < TP_MAX_PORTS; k++) {
            tp_port_t *p = &P->ports[k];
            if (p->used && !p->cut && (!worst || p->nrefs > worst->nrefs))
                worst = p;
        }
        if (!worst || !worst->nrefs)
            return -1;
        tp_cut(P, worst, "it holds samples when the pool is full");
    }
    return P->free_[--P->nfree];
}

/* The index of a subscriber whose next entry is still unclaimed (no room in block mode), or -1 */
static int tp_full(TopicPubObject *P)
{
    for (int k = 0; k < TP_MAX_PORTS; k++) {
        tp_port_t *p = &P->ports[k];
        if (!p->used || p->cut || p->head < p->depth)
            continue;
        uint64_t s = p->head - p->depth;
        if (__atomic_load_n(&tp_entry(p->ring, s % p->depth)->state, __ATOMIC_ACQUIRE) ==
            s * 4 + TP_ST_WRITTEN)
            return k;
    }
    return -1;
}

static int tp_data(PyObject *seq, uint64_t out[4])
{
    out[0] = out[1] = out[2] = out[3] = 0;
    if (seq == NULL || seq == Py_None)
        return 0;
    PyObject *fast = PySequence_Fast(seq, "data must be a sequence of at most 4 ints");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > 4) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "data holds at most 4 words, got %zd", n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == (uint64_t)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "data words are u64");
            }
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* ---- Python API ----------------------------------------------------------------------------- */

static PyObject *tpub_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"pool", "slots", "slot_size", "history", "max_held", "block",
                             "max_size", NULL};
    PyObject *pool;
    unsigned int slots, history, max_held;
    unsigned long long slot_size, max_size = 0;
    int block = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OIKII|pK", kwlist, &pool, &slots, &slot_size,
                                     &history, &max_held, &block, &max_size))
        return NULL;
    TopicPubObject *P = (TopicPubObject *)type->tp_alloc(type, 0);
    if (!P)
        return NULL;
    if (PyObject_GetBuffer(pool, &P->pb, PyBUF_WRITABLE) < 0) {
        Py_DECREF(P);
        return NULL;
    }
    if (!slots || !slot_size || (uint64_t)P->pb.len < TP_POOL_HEADER ||
        ((uint64_t)P->pb.len - TP_POOL_HEADER) / slot_size < slots) {
        PyErr_SetString(PyExc_ValueError, "a pool too small for its slots");
        Py_DECREF(P);
        return NULL;
    }
    P->pool = P->pb.buf;
    P->slots = slots;
    P->slot_size = slot_size;
    P->max_held = max_held;
    P->hist_n = history;
    P->refs = PyMem_Calloc(slots, sizeof(uint32_t));
    P->free_ = PyMem_Calloc(slots, sizeof(uint32_t));
    P->hist = history ? PyMem_Calloc(history, sizeof(tp_entry_t)) : NULL;
    if (!P->refs || !P->free_ || (history && !P->hist)) {
        Py_DECREF(P);
        return PyErr_NoMemory();
    }
    for (uint32_t s = 0; s < slots; s++)
        P->free_[s] = slots - 1 - s; /* slot 0 first */
    P->nfree = slots;
    P->gen = fork_gen;
    P->block = block;
    P->max_size = max_size && max_size < slot_size ? max_size : slot_size;
    return (PyObject *)P;
}

static void tpub_dealloc(TopicPubObject *P)
{
    for (int k = 0; k < TP_MAX_PORTS; k++)
        tp_port_free(P, &P->ports[k]);
    PyMem_Free(P->refs);
    PyMem_Free(P->free_);
    PyMem_Free(P->hist);
    if (P->pb.obj)
        PyBuffer_Release(&P->pb);
    Py_TYPE(P)->tp_free((PyObject *)P);
}

static PyObject *tpub_add(TopicPubObject *P, PyObject *args)
{
    unsigned int index, depth;
    PyObject *ring;
    int event_fd;
    if (!PyArg_ParseTuple(args, "IOIi:add", &index, &ring, &depth, &event_fd))
        return NULL;
    if (index >= TP_MAX_PORTS || !depth) {
        PyErr_Format(PyExc_ValueError, "subscriber index %u / depth %u out of range", index, depth);
        return NULL;
    }
    tp_port_t *p = &P->ports[index];
    if (p->used && p->cut)
        P->ncut--;
    tp_port_free(P, p);
    memset(p, 0, sizeof *p);
    if (PyObject_GetBuffer(ring, &p->rb, PyBUF_WRITABLE) < 0)
        return NULL;
    uint64_t relcap = 1;
    while (relcap < (uint64_t)depth + P->max_held)
        relcap *= 2;
    p->rel_off = TP_R_ENTRIES_OFF + (uint64_t)depth * TP_ENTRY_SIZE;
    if ((uint64_t)p->rb.len < p->rel_off + relcap * 4) {
        PyBuffer_Release(&p->rb);
        PyErr_SetString(PyExc_ValueError, "a subscription ring too small for its depth");
        return NULL;
    }
    p->placed = PyMem_Malloc(depth * sizeof(int32_t));
    p->refs = PyMem_Calloc(P->slots, sizeof(uint32_t));
    if (!p->placed || !p->refs) {
        PyMem_Free(p->placed);
        PyMem_Free(p->refs);
        PyBuffer_Release(&p->rb);
        return PyErr_NoMemory();
    }
    for (uint32_t i = 0; i < depth; i++)
        p->placed[i] = -1;
    p->ring = p->rb.buf;
    p->index = index;
    p->depth = depth;
    p->relcap = relcap;
    p->bound = (uint64_t)depth + P->max_held;
    p->event_fd = event_fd;
    p->used = 1;
    /* The history, oldest first (at most depth of it) */
    uint32_t skip = P->hist_len > depth ? P->hist_len - depth : 0;
    for (uint32_t k = skip; k < P->hist_len && !p->cut; k++) {
        tp_entry_t *h = &P->hist[(P->hist_at + k) % P->hist_n];
        tp_place(P, p, h->slot, h->length, h->opcode, h->data, h->seq, 0);
    }
    Py_RETURN_NONE;
}

static PyObject *tpub_remove(TopicPubObject *P, PyObject *arg)
{
    unsigned long index = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (index < TP_MAX_PORTS) {
        tp_port_t *p = &P->ports[index];
        if (p->used && p->cut)
            P->ncut--;
        tp_port_free(P, p);
    }
    Py_RETURN_NONE;
}

/* publish(payload, opcode, data) -> seq: copy into a free slot and deliver (the hot path). */
static PyObject *tpub_publish(TopicPubObject *P, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "publish(payload, opcode, data)");
        return NULL;
    }
    if (tp_forked(P->gen, "topic publisher") < 0)
        return NULL;
    uint64_t data[4];
    unsigned long opcode = PyLong_AsUnsignedLong(args[1]);
    if ((opcode == (unsigned long)-1 && PyErr_Occurred()) || tp_data(args[2], data) < 0)
        return NULL;
    if (opcode > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "opcode is a u32");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((uint64_t)b.len > P->max_size) {
        PyBuffer_Release(&b);
        PyErr_Format(PyExc_ValueError, "a payload of %zd bytes exceeds the topic's max_size %llu",
                     b.len, (unsigned long long)P->max_size);
        return NULL;
    }
    if (P->block && tp_full(P) >= 0) {
        PyBuffer_Release(&b);
        Py_RETURN_FALSE; /* Python waits for room */
    }
    int64_t slot = tp_alloc(P);
    if (slot < 0) {
        PyBuffer_Release(&b);
        Py_RETURN_NONE; /* Python explains */
    }
    memcpy(P->pool + TP_POOL_HEADER + (uint64_t)slot * P->slot_size, b.buf, (size_t)b.len);
    uint32_t n = (uint32_t)b.len;
    PyBuffer_Release(&b);
    P->refs[slot]++; /* ours while delivering */
    uint64_t seq = tp_deliver(P, (uint32_t)slot, n, (uint32_t)opcode, data, 0);
    tp_unref(P, (uint32_t)slot);
    return PyLong_FromUnsignedLongLong(seq);
}

/* alloc() -> a free slot with one reference (a loan's), or None */
static PyObject *tpub_alloc(TopicPubObject *P, PyObject *unused)
{
    int64_t slot = tp_alloc(P);
    if (slot < 0)
        Py_RETURN_NONE;
    P->refs[slot]++;
    return PyLong_FromLongLong(slot);
}

static PyObject *tpub_unref(TopicPubObject *P, PyObject *arg)
{
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (slot >= P->slots || !P->refs[slot]) {
        PyErr_SetString(PyExc_ValueError, "not a referenced slot");
        return NULL;
    }
    tp_unref(P, (uint32_t)slot);
    Py_RETURN_NONE;
}

/* deliver(slot, n, opcode, data) -> seq: a loaned slot, written in place */
static PyObject *tpub_deliver(TopicPubObject *P, PyObject *args)
{
    unsigned int slot, n, opcode;
    PyObject *dataobj;
    uint64_t data[4];
    if (!PyArg_ParseTuple(args, "IIIO:deliver", &slot, &n, &opcode, &dataobj) ||
        tp_data(dataobj, data) < 0)
        return NULL;
    if (slot >= P->slots || !P->refs[slot] || n > P->slot_size) {
        PyErr_SetString(PyExc_ValueError, "deliver: not a loaned slot, or too long");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(tp_deliver(P, slot, n, opcode, data, 0));
}

/* full() -> the index of a subscriber whose next entry is still unclaimed, or -1 (block mode) */
static PyObject *tpub_full(TopicPubObject *P, PyObject *unused)
{
    return PyLong_FromLong(tp_full(P));
}

/* take_cuts() -> [(index, reason)] of subscribers cut off since the last call (still listed
 * until remove(index)) */
static PyObject *tpub_take_cuts(TopicPubObject *P, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (!out || !P->ncut)
        return out;
    for (int k = 0; k < TP_MAX_PORTS; k++) {
        tp_port_t *p = &P->ports[k];
        if (p->used && p->cut) {
            PyObject *t = Py_BuildValue("(is)", k, p->reason);
            if (!t || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(t);
        }
    }
    return out;
}

static PyObject *tpub_refs(TopicPubObject *P, PyObject *unused)
{
    uint64_t total = 0;
    for (uint32_t s = 0; s < P->slots; s++)
        total += P->refs[s];
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *tpub_publish_many(TopicPubObject *P, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef tpub_methods[] = {
    {"add", (PyCFunction)tpub_add, METH_VARARGS,
     "add(index, ring, depth, event_fd): a subscriber (its history first)"},
    {"remove", (PyCFunction)tpub_remove, METH_O, "remove(index): it left; free what it held"},
    {"publish", (PyCFunction)(void (*)(void))tpub_publish, METH_FASTCALL,
     "publish(payload, opcode, data) -> seq, None when no slot is free, False when a "
     "subscriber has no room (block)"},
    {"publish_many", (PyCFunction)(void (*)(void))tpub_publish_many, METH_FASTCALL,
     "publish_many(items, start, block, max_size) -> (published, last seq, full)"},
    {"alloc", (PyCFunction)tpub_alloc, METH_NOARGS, "alloc() -> a slot (one reference) or None"},
    {"unref", (PyCFunction)tpub_unref, METH_O, "unref(slot): drop one reference"},
    {"deliver", (PyCFunction)tpub_deliver, METH_VARARGS,
     "deliver(slot, n, opcode, data) -> seq"},
    {"full", (PyCFunction)tpub_full, METH_NOARGS,
     "full() -> index of a subscriber without room, or -1"},
    {"take_cuts", (PyCFunction)tpub_take_cuts, METH_NOARGS,
     "take_cuts() -> [(index, reason)] of subscribers cut off"},
    {"refs", (PyCFunction)tpub_refs, METH_NOARGS, "refs() -> references held, in all"},
    {NULL, NULL, 0, NULL},
};

static PyObject *tpub_get_seq(TopicPubObject *P, void *c)
{
    return PyLong_FromUnsignedLongLong(P->seq);
}

static PyObject *tpub_get_ncut(TopicPubObject *P, void *c)
{
    return PyLong_FromLong(P->ncut);
}

static PyGetSetDef tpub_getset[] = {
    {"seq", (getter)tpub_get_seq, NULL, "samples published", NULL},
    {"cuts", (getter)tpub_get_ncut, NULL, "subscribers cut off and not yet removed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TopicPubType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.TopicPub",
    .tp_basicsize = sizeof(TopicPubObject),
    .tp_dealloc = (destructor)tpub_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = tpub_new,
    .tp_methods = tpub_methods,
    .tp_getset = tpub_getset,
    .tp_doc = "TopicPub(pool, slots, slot_size, history, max_held): a publisher's data path",
};
