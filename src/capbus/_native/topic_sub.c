/*
 * _native/topic_sub.c: TopicSub, a subscriber's data path of a topic: claim the next delivery
 * entry (compare-and-swap of its state word), skip what drop-oldest took, give slots back
 * through the release ring. The Python Subscriber (_runtime/topic.py) owns one and calls it
 * under its lock; GIL held, never blocks (sleeping is Python's, on the ring's futex word).
 * Trust: the ring is written by the publisher, possibly hostile: every value is checked (the
 * head never goes back, an entry's slot below the kernel's slot count and its length at most
 * max_size, sequence numbers increase, an entry is never half-written for long); garbage is
 * reported as a reason string (Python drops the topic with CorruptChannel). Hot path: take().
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

#define TP_CORRUPT_SPINS 2000000 /* an entry half-written this long is garbage */

typedef struct {
    PyObject_HEAD
    Py_buffer rb;
    char *ring;
    uint64_t slots, depth, max_size, relcap, rel_off;
    uint64_t next, head_seen, last_seq, rel_head, taken, dropped, gap;
} TopicSubObject;

static PyTypeObject TopicSubType;

static PyObject *tsub_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring", "slots", "depth", "max_size", "relcap", NULL};
    PyObject *ring;
    unsigned long long slots, depth, max_size, relcap;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OKKKK", kwlist, &ring, &slots, &depth, &max_size,
                                     &relcap))
        return NULL;
    TopicSubObject *S = (TopicSubObject *)type->tp_alloc(type, 0);
    if (!S)
        return NULL;
    if (PyObject_GetBuffer(ring, &S->rb, PyBUF_WRITABLE) < 0) {
        Py_DECREF(S);
        return NULL;
    }
    S->rel_off = TP_R_ENTRIES_OFF + depth * TP_ENTRY_SIZE;
    if (!depth || !relcap || (uint64_t)S->rb.len < S->rel_off + relcap * 4) {
        PyErr_SetString(PyExc_ValueError, "a subscription ring too small for its depth");
        Py_DECREF(S);
        return NULL;
    }
    S->ring = S->rb.buf;
    S->slots = slots;
    S->depth = depth;
    S->max_size = max_size;
    S->relcap = relcap;
    return (PyObject *)S;
}

static void tsub_dealloc(TopicSubObject *S)
{
    if (S->rb.obj)
        PyBuffer_Release(&S->rb);
    Py_TYPE(S)->tp_free((PyObject *)S);
}

static PyObject *tsub_corrupt(const char *fmt, unsigned long long a, unsigned long long b)
{
    return PyUnicode_FromFormat(fmt, a, b);
}

/* take() -> None (nothing new), (slot, length, opcode, data, seq, gap), or a str: what the
 * publisher got wrong. */
static PyObject *tsub_take(TopicSubObject *S, PyObject *unused)
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
                __atomic_store_n(tp_u64(ring, TP_R_TAKEN_OFF), S->taken, __ATOMIC_RELAXED);
                uint64_t gap = S->gap;
                if (gap)
                    __atomic_store_n(tp_u64(ring, TP_R_DROPPED_OFF), S->dropped, __ATOMIC_RELAXED);
                S->gap = 0;
                if (__atomic_load_n(tp_u32(ring, TP_R_PUB_WAITING_OFF), __ATOMIC_SEQ_CST)) {
                    __atomic_add_fetch(tp_u32(ring, TP_R_PUB_WAKE_OFF), 1, __ATOMIC_SEQ_CST);
                    sys_futex_wake(tp_u32(ring, TP_R_PUB_WAKE_OFF), INT_MAX);
                }
                return Py_BuildValue("(IIIKKKKKK)", copy.slot, copy.length, copy.opcode,
                                     (unsigned long long)copy.data[0],
                                     (unsigned long long)copy.data[1],
                                     (unsigned long long)copy.data[2],
                                     (unsigned long long)copy.data[3],
                                     (unsigned long long)copy.seq, (unsigned long long)gap);
            }
            continue; /* the publisher took it back just now: we were lapped */
        }
        if (state >> 2 < nxt)
            return tsub_corrupt("entry %llu is not written though the head is %llu", nxt, head);
        if (++spins > TP_CORRUPT_SPINS) /* it is rewriting it (it lapped us): look again */
            return tsub_corrupt("entry %llu stayed half-written (head %llu)", nxt, head);
    }
}

/* release(slot) -> True, or False if the release ring is stuck (the publisher's fault) */
static PyObject *tsub_release(TopicSubObject *S, PyObject *arg)
{
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    char *ring = S->ring;
    uint64_t tail = __atomic_load_n(tp_u64(ring, TP_R_REL_TAIL_OFF), __ATOMIC_ACQUIRE);
    uint64_t head = S->rel_head;
    if (tail > head || head - tail >= S->relcap)
        Py_RETURN_FALSE;
    __atomic_store_n(tp_u32(ring, S->rel_off + (head % S->relcap) * 4), (uint32_t)slot,
                     __ATOMIC_RELAXED);
    S->rel_head = head + 1;
    __atomic_store_n(tp_u64(ring, TP_R_REL_HEAD_OFF), head + 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(tp_u32(ring, TP_R_PUB_WAITING_OFF), __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(tp_u32(ring, TP_R_PUB_WAKE_OFF), 1, __ATOMIC_SEQ_CST);
        sys_futex_wake(tp_u32(ring, TP_R_PUB_WAKE_OFF), INT_MAX);
    }
    Py_RETURN_TRUE;
}

/* pending() -> the ring's head differs from our next entry (something may be there) */
static PyObject *tsub_pending(TopicSubObject *S, PyObject *unused)
{
    return PyBool_FromLong(__atomic_load_n(tp_u64(S->ring, TP_R_HEAD_OFF), __ATOMIC_SEQ_CST) !=
                           S->next);
}

static PyMethodDef tsub_methods[] = {
    {"take", (PyCFunction)tsub_take, METH_NOARGS,
     "take() -> None, (slot, length, opcode, d0, d1, d2, d3, seq, gap), or a str (garbage)"},
    {"release", (PyCFunction)tsub_release, METH_O, "release(slot) -> False if the ring is stuck"},
    {"pending", (PyCFunction)tsub_pending, METH_NOARGS, "pending() -> head != next"},
    {NULL, NULL, 0, NULL},
};

static PyObject *tsub_get_dropped(TopicSubObject *S, void *c)
{
    return PyLong_FromUnsignedLongLong(S->dropped);
}

static PyGetSetDef tsub_getset[] = {
    {"dropped", (getter)tsub_get_dropped, NULL, "samples lost to drop-oldest, in all", NULL},
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
    .tp_doc = "TopicSub(ring, slots, depth, max_size, relcap): a subscriber's data path",
};
