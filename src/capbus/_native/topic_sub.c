/*
 * _native/topic_sub.c: TopicSub, a subscriber's data path of a topic: claim the next delivery
 * entry (compare-and-swap of its state word), skip what drop-oldest took, give slots back
 * through the release ring. The Python Subscriber (_runtime/topic.py) owns one and calls it
 * under its lock; GIL held, never blocks (sleeping is Python's, on the ring's futex word).
 * Trust: the ring is written by the publisher, possibly hostile: every value is checked (the
 * head never goes back, an entry's slot below the kernel's slot count and its length at most
 * max_size, sequence numbers increase, no entry stays half-written for 2 s); garbage is
 * reported as a reason string (Python drops the topic with CorruptChannel). Hot path: take(),
 * which makes the Sample (topic_sample.c) and gives back released slots.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* An entry the publisher is writing (it lapped us, or it was preempted in the middle): spin a
 * little, then report "nothing yet" (the caller waits and looks again). Only an entry that stays
 * half-written for TP_HALF_WRITTEN_NS is garbage: a spin count alone (it was 2,000,000) took an
 * honest publisher preempted for a few ms on a busy machine for a hostile one. */
#define TP_HALF_SPINS 1000
#define TP_HALF_WRITTEN_NS 2000000000ull

static PyTypeObject TopicSubType;

static PyObject *tsub_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring", "pool", "slots", "depth", "slot_size", "max_size", "relcap",
                             "max_held", "publisher", NULL};
    PyObject *ring, *pool;
    unsigned long long slots, depth, slot_size, max_size, relcap, publisher;
    unsigned int max_held;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOKKKKKIK", kwlist, &ring, &pool, &slots, &depth,
                                     &slot_size, &max_size, &relcap, &max_held, &publisher))
        return NULL;
    TopicSubObject *S = (TopicSubObject *)type->tp_alloc(type, 0);
    if (!S)
        return NULL;
    if (PyObject_GetBuffer(ring, &S->rb, PyBUF_WRITABLE) < 0) {
        Py_DECREF(S);
        return NULL;
    }
    if (PyObject_GetBuffer(pool, &S->pb, PyBUF_SIMPLE) < 0) {
        Py_DECREF(S);
        return NULL;
    }
    S->rel_off = TP_R_ENTRIES_OFF + depth * TP_ENTRY_SIZE;
    if (!depth || !relcap || !max_held || (uint64_t)S->rb.len < S->rel_off + relcap * 4) {
        PyErr_SetString(PyExc_ValueError, "a subscription ring too small for its depth");
        Py_DECREF(S);
        return NULL;
    }
    if (max_size > slot_size || (uint64_t)S->pb.len < TP_POOL_HEADER ||
        ((uint64_t)S->pb.len - TP_POOL_HEADER) / slot_size < slots) {
        PyErr_SetString(PyExc_ValueError, "a pool too small for its slots");
        Py_DECREF(S);
        return NULL;
    }
    S->freed = PyMem_Calloc(max_held, sizeof(uint32_t));
    if (!S->freed) {
        Py_DECREF(S);
        return PyErr_NoMemory();
    }
    S->ring = S->rb.buf;
    S->slots = slots;
    S->depth = depth;
    S->slot_size = slot_size;
    S->max_size = max_size;
    S->relcap = relcap;
    S->max_held = max_held;
    S->publisher = publisher;
    S->gen = fork_gen;
    return (PyObject *)S;
}

static void tsub_dealloc(TopicSubObject *S)
{
    if (S->rb.obj)
        PyBuffer_Release(&S->rb);
    if (S->pb.obj)
        PyBuffer_Release(&S->pb);
    PyMem_Free(S->freed);
    Py_XDECREF(S->pending);
    Py_TYPE(S)->tp_free((PyObject *)S);
}

/* Give back the slots of released, viewless samples (the release ring); 0, or -1 if the
 * publisher stopped taking them back (it always does before it delivers). */
static int tsub_push(TopicSubObject *S)
{
    if (!S->nfreed)
        return 0;
    if (S->gen != fork_gen) { /* a forked child dropping what it inherited: not ours */
        S->nfreed = 0;
        return 0;
    }
    char *ring = S->ring;
    uint64_t tail = __atomic_load_n(tp_u64(ring, TP_R_REL_TAIL_OFF), __ATOMIC_ACQUIRE);
    uint64_t head = S->rel_head;
    for (uint32_t k = 0; k < S->nfreed; k++) {
        if (tail > head || head - tail >= S->relcap) {
            S->stuck = 1;
            S->nfreed = 0;
            return -1;
        }
        __atomic_store_n(tp_u32(ring, S->rel_off + (head % S->relcap) * 4), S->freed[k],
                         __ATOMIC_RELAXED);
        head++;
    }
    S->nfreed = 0;
    S->rel_head = head;
    __atomic_store_n(tp_u64(ring, TP_R_REL_HEAD_OFF), head, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(tp_u32(ring, TP_R_PUB_WAITING_OFF), __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(tp_u32(ring, TP_R_PUB_WAKE_OFF), 1, __ATOMIC_SEQ_CST);
        sys_futex_wake(tp_u32(ring, TP_R_PUB_WAKE_OFF), INT_MAX);
    }
    return 0;
}

static PyObject *tsub_corrupt(const char *fmt, unsigned long long a, unsigned long long b)
{
    return PyUnicode_FromFormat(fmt, a, b);
}

/* A block-mode publisher waits for room: tell it we claimed some (once per take or batch). */
static inline void tsub_room(TopicSubObject *S)
{
    char *ring = S->ring;
    __atomic_store_n(tp_u64(ring, TP_R_TAKEN_OFF), S->taken, __ATOMIC_RELAXED);
    if (__atomic_load_n(tp_u32(ring, TP_R_PUB_WAITING_OFF), __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(tp_u32(ring, TP_R_PUB_WAKE_OFF), 1, __ATOMIC_SEQ_CST);
        sys_futex_wake(tp_u32(ring, TP_R_PUB_WAKE_OFF), INT_MAX);
    }
}

/* Claim one entry: a new Sample, None (nothing new), or a str (the publisher's garbage). The
 * caller checked held < max_held and calls tsub_room() once it has claimed what it wants. */
static PyObject *tsub_take_one(TopicSubObject *S)
{
    char *ring = S->ring;
    uint64_t depth = S->depth;
    long spins = 0;
    for (;;) {
        uint64_t head = __atomic_load_n(tp_u64(ring, TP_R_HEAD_OFF), __ATOMIC_ACQUIRE);
        if (head < S->head_seen)
            return tsub_corrupt("the ring's head went back from %llu to %llu",
                                (unsigned long long)S->head_seen, (unsigned long long)head);
        S->head_seen = head;
        uint64_t nxt = S->next;
        if (nxt >= head)
            return Py_NewRef(Py_None);
        if (head - nxt > depth) { /* lapped: the oldest are gone */
            uint64_t lost = head - depth - nxt;
            S->gap += lost;
            S->dropped += lost;
            nxt = S->next = head - depth;
        }
        tp_entry_t *e = tp_entry(ring, nxt % depth);
        uint64_t state = __atomic_load_n(&e->state, __ATOMIC_ACQUIRE);
        if (state == nxt * 4 + TP_ST_WRITTEN) {
            tp_entry_t copy;
            memcpy(&copy, e, sizeof copy);
            if (__atomic_compare_exchange_n(&e->state, &state, nxt * 4 + TP_ST_TAKEN, 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                S->next = nxt + 1;
                if (copy.slot >= S->slots)
                    return tsub_corrupt("slot %llu of a pool of %llu", copy.slot, S->slots);
                if (copy.length > S->max_size)
                    return tsub_corrupt("a sample of %llu bytes, max_size is %llu", copy.length,
                                        S->max_size);
                if (copy.seq <= S->last_seq)
                    return tsub_corrupt("sequence %llu after %llu", copy.seq, S->last_seq);
                S->last_seq = copy.seq;
                S->taken++;
                uint64_t gap = S->gap;
                if (gap)
                    __atomic_store_n(tp_u64(ring, TP_R_DROPPED_OFF), S->dropped, __ATOMIC_RELAXED);
                S->gap = 0;
                return (PyObject *)ts_make(S, &copy, gap);
            }
            continue; /* the publisher took it back just now: we were lapped */
        }
        if (state >> 2 < nxt)
            return tsub_corrupt("entry %llu is not written though the head is %llu", nxt, head);
        if (++spins < TP_HALF_SPINS) /* it is rewriting it (it lapped us): look again */
            continue;
        uint64_t now = now_ns();
        if (S->half_seq != nxt + 1) {
            S->half_seq = nxt + 1;
            S->half_since = now;
        } else if (now - S->half_since > TP_HALF_WRITTEN_NS) {
            return tsub_corrupt("entry %llu stayed half-written for 2 s (head %llu)", nxt, head);
        }
        return Py_NewRef(Py_None);
    }
}

static PyObject *tsub_stuck_reason(void)
{
    return PyUnicode_FromString("its release ring is stuck (the publisher takes nothing back)");
}

/* The checks take() and take_many() start with, after giving back released slots: 0 to go on,
 * 1 with *out what to return instead (the publisher's garbage found last time, the stuck release
 * ring, or False while max_held samples are held), -1 on an error. */
static int tsub_ready(TopicSubObject *S, PyObject **out)
{
    if (tp_forked(S->gen, "topic subscription") < 0)
        return -1;
    if (S->pending)
        *out = Py_NewRef(S->pending);
    else if (tsub_push(S) < 0 || S->stuck)
        *out = tsub_stuck_reason();
    else if (S->held >= S->max_held)
        *out = Py_NewRef(Py_False);
    else
        return 0;
    return *out ? 1 : -1;
}

/* take() -> a Sample, None (nothing new), False (it holds max_held samples: release some), or
 * a str: what the publisher got wrong. Gives back released slots first. */
static PyObject *tsub_take(TopicSubObject *S, PyObject *unused)
{
    PyObject *early;
    int r = tsub_ready(S, &early);
    if (r)
        return r < 0 ? NULL : early;
    PyObject *got = tsub_take_one(S);
    if (got && Py_IS_TYPE(got, &TopicSampleType))
        tsub_room(S);
    return got;
}

/* take_many(n) -> a list of 1..n Samples, or what take() says when there is not even one.
 * One pass gives back every slot released since (a dropped list of samples is one pass), one
 * wake of a waiting publisher per batch. Garbage found behind samples already claimed is kept
 * and reported by the next call (the samples before it were checked and are good). */
static PyObject *tsub_take_many(TopicSubObject *S, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "take_many(n): n must be at least 1");
        return NULL;
    }
    PyObject *early;
    int r = tsub_ready(S, &early);
    if (r)
        return r < 0 ? NULL : early;
    uint64_t room = S->max_held - S->held;
    if ((uint64_t)n > room)
        n = (Py_ssize_t)room;
    uint64_t head = __atomic_load_n(tp_u64(S->ring, TP_R_HEAD_OFF), __ATOMIC_ACQUIRE);
    if (head > S->next && head - S->next < (uint64_t)n)
        n = (Py_ssize_t)(head - S->next); /* what is there now: the list's size, exactly */
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    Py_ssize_t k = 0;
    while (k < n) {
        PyObject *got = tsub_take_one(S);
        if (!got) {
            Py_DECREF(out);
            return NULL;
        }
        if (!Py_IS_TYPE(got, &TopicSampleType)) {
            if (k == 0) {
                Py_DECREF(out);
                return got; /* None, or garbage with nothing before it */
            }
            if (got != Py_None)
                S->pending = got;
            else
                Py_DECREF(got);
            break;
        }
        PyList_SET_ITEM(out, k++, got);
    }
    if (k < n) /* fewer than the head promised (lapped, or garbage): shrink */
        if (PyList_SetSlice(out, k, n, NULL) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    tsub_room(S);
    return out;
}

/* flush() -> False if the release ring is stuck: give back what was released now */
static PyObject *tsub_flush(TopicSubObject *S, PyObject *unused)
{
    return PyBool_FromLong(tsub_push(S) == 0 && !S->stuck);
}

/* pending() -> the ring's head differs from our next entry (something may be there) */
static PyObject *tsub_pending(TopicSubObject *S, PyObject *unused)
{
    return PyBool_FromLong(__atomic_load_n(tp_u64(S->ring, TP_R_HEAD_OFF), __ATOMIC_SEQ_CST) !=
                           S->next);
}

static PyMethodDef tsub_methods[] = {
    {"take", (PyCFunction)tsub_take, METH_NOARGS,
     "take() -> a Sample, None, False (max_held reached) or a str (the publisher's garbage)"},
    {"take_many", (PyCFunction)tsub_take_many, METH_O,
     "take_many(n) -> a list of 1..n Samples, or None, False or a str as take() says"},
    {"flush", (PyCFunction)tsub_flush, METH_NOARGS,
     "flush() -> False if the release ring is stuck: give released slots back now"},
    {"pending", (PyCFunction)tsub_pending, METH_NOARGS, "pending() -> head != next"},
    {NULL, NULL, 0, NULL},
};

static PyObject *tsub_get_dropped(TopicSubObject *S, void *c)
{
    return PyLong_FromUnsignedLongLong(S->dropped);
}

static PyObject *tsub_get_held(TopicSubObject *S, void *c)
{
    return PyLong_FromUnsignedLong(S->held);
}

static PyGetSetDef tsub_getset[] = {
    {"dropped", (getter)tsub_get_dropped, NULL, "samples lost to drop-oldest, in all", NULL},
    {"held", (getter)tsub_get_held, NULL, "samples handed out whose slot is not back yet", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TopicSubType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.TopicSub",
    .tp_basicsize = sizeof(TopicSubObject),
    .tp_dealloc = (destructor)tsub_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = tsub_new,
    .tp_methods = tsub_methods,
    .tp_getset = tsub_getset,
    .tp_doc = "TopicSub(ring, pool, slots, depth, slot_size, max_size, relcap, max_held, "
              "publisher): a subscriber's data path",
};
