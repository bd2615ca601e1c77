/*
 * _native/topic_batch.c: TopicPub.publish_many, the publisher's batch path: many samples in
 * one call, one fence and at most one wake per subscriber per batch (topic_pub.c's tp_place
 * with defer, then tp_wake_dirty). The Python Publisher.publish_many calls it under its lock;
 * GIL held, never blocks (in block mode it stops where a subscriber has no room and Python
 * waits). Trust: as topic_pub.c (nothing here reads more from a ring than tp_place and
 * tp_full do). Hot path.
 * Not compiled alone: module.c #includes it after topic_pub.c (one translation unit).
 */

/* The end of a batch: one full fence (after every head store), then each subscriber that got
 * something is woken if it sleeps. */
static void tp_wake_dirty(TopicPubObject *P)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (int k = 0; k < TP_MAX_PORTS; k++) {
        tp_port_t *p = &P->ports[k];
        if (p->dirty) {
            p->dirty = 0;
            if (p->used && !p->cut)
                tp_wake(p);
        }
    }
}

/* One item of a batch: 1 published, 0 no free slot, 2 no room (block), -1 an error set. */
static int tp_batch_one(TopicPubObject *P, PyObject *it, Py_ssize_t i, uint64_t limit, int block,
                        int first)
{
    if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 3) {
        PyErr_Format(PyExc_TypeError, "publish_many: item %zd is not an (opcode, data, "
                     "payload) tuple", i);
        return -1;
    }
    uint64_t data[4];
    unsigned long opcode = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(it, 0));
    if ((opcode == (unsigned long)-1 && PyErr_Occurred()) ||
        tp_data(PyTuple_GET_ITEM(it, 1), data) < 0)
        return -1;
    if (opcode > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "opcode is a u32");
        return -1;
    }
    if (block && tp_full(P) >= 0)
        return 2;
    Py_buffer b;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(it, 2), &b, PyBUF_SIMPLE) < 0)
        return -1;
    if ((uint64_t)b.len > limit) {
        PyErr_Format(PyExc_ValueError, "item %zd: a payload of %zd bytes exceeds the topic's "
                     "max_size %llu (the items before it were published)", i, b.len,
                     (unsigned long long)limit);
        PyBuffer_Release(&b);
        return -1;
    }
    /* The first item collects releases; later ones only when the free stack is empty */
    int64_t slot = (!first && P->nfree) ? (int64_t)P->free_[--P->nfree] : tp_alloc(P);
    if (slot < 0) {
        PyBuffer_Release(&b);
        return 0; /* Python explains */
    }
    memcpy(P->pool + TP_POOL_HEADER + (uint64_t)slot * P->slot_size, b.buf, (size_t)b.len);
    uint32_t n = (uint32_t)b.len;
    PyBuffer_Release(&b);
    P->refs[slot]++;
    tp_deliver(P, (uint32_t)slot, n, (uint32_t)opcode, data, 1);
    tp_unref(P, (uint32_t)slot);
    return 1;
}

/* publish_many(items, start, block, max_size) -> (published, last seq,
 * full): copy and deliver items[start:],
 * each an (opcode, data, payload) tuple, in one call; one fence and at most one wake per
 * subscriber for the batch. With block, it stops before an item for which a subscriber has no
 * room (full: True; Python waits and calls again from there); it also stops when no slot is
 * free (full: False). A bad
 * item raises before anything after it is published (Python says how many were). */
static PyObject *tpub_publish_many(TopicPubObject *P, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "publish_many(items: list, start, block, max_size)");
        return NULL;
    }
    if (tp_forked(P->gen, "topic publisher") < 0)
        return NULL;
    PyObject *items = args[0];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    int block = PyObject_IsTrue(args[2]);
    unsigned long long limit = PyLong_AsUnsignedLongLong(args[3]);
    if ((start == -1 && PyErr_Occurred()) || block < 0 ||
        (limit == (unsigned long long)-1 && PyErr_Occurred()))
        return NULL;
    if (limit > P->slot_size)
        limit = P->slot_size;
    Py_ssize_t i = start < 0 ? 0 : start, count = 0;
    int failed = 0, full = 0;
    for (; i < PyList_GET_SIZE(items); i++) {
        /* Ours while we use it: converting its fields may run Python code (__index__, a
         * sequence's __iter__) that empties the list. */
        PyObject *it = Py_NewRef(PyList_GET_ITEM(items, i));
        int r = tp_batch_one(P, it, i, limit, block, count == 0);
        Py_DECREF(it);
        if (r < 0)
            failed = 1;
        if (r == 2)
            full = 1;
        if (r != 1)
            break;
        count++;
    }
    tp_wake_dirty(P);
    if (failed)
        return NULL;
    return Py_BuildValue("(nKO)", count, (unsigned long long)P->seq, full ? Py_True : Py_False);
}
