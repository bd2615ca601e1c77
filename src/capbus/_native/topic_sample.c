/*
 * _native/topic_sample.c: Sample, one received topic sample (capbus.Sample): its fields and the
 * read-only view of the publisher's pool it exports. GIL held; made by TopicSub.take() on the
 * hot path (one object per sample, no copy of the payload).
 * Trust: slot and length were checked by take() against the kernel's geometry before a Sample
 * is made; the memory may be changed by a hostile publisher while it is read (that is its own
 * data), never unmapped (the TopicSub holds the pool).
 * The export rule is the ZBuf's (zbuf.c): the slot goes back to the publisher only once the
 * sample is released (release(), the end of a with block, or deallocation) AND no view of its
 * payload is left (every memoryview made from one shares its managed buffer, one export).
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

typedef struct {
    PyObject_HEAD
    TopicSubObject *owner; /* strong: its pool mapping and where the slot goes back */
    char *buf;
    Py_ssize_t len;
    uint32_t slot, opcode;
    uint64_t data[4], seq, dropped;
    Py_ssize_t exports;
    int done, fired;
} TopicSampleObject;

static PyTypeObject TopicSampleType;

static void ts_fire(TopicSampleObject *T)
{
    if (T->fired)
        return;
    T->fired = 1;
    TopicSubObject *S = T->owner;
    S->held--;
    if (S->nfreed < S->max_held) /* always: held <= max_held */
        S->freed[S->nfreed++] = T->slot;
}

static int ts_getbuf(TopicSampleObject *T, Py_buffer *view, int flags)
{
    if (T->done) {
        view->obj = NULL;
        PyErr_SetString(PyExc_BufferError,
                        "this sample was released: keep a view of its payload from before, or a "
                        "copy, for as long as you need the bytes");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)T, T->buf, T->len, 1, flags) < 0)
        return -1;
    T->exports++;
    return 0;
}

static void ts_releasebuf(TopicSampleObject *T, Py_buffer *view)
{
    if (--T->exports == 0 && T->done)
        ts_fire(T);
}

static PyBufferProcs ts_as_buffer = {(getbufferproc)ts_getbuf, (releasebufferproc)ts_releasebuf};

static TopicSampleObject *ts_make(TopicSubObject *S, const tp_entry_t *e, uint64_t gap)
{
    TopicSampleObject *T = PyObject_New(TopicSampleObject, &TopicSampleType);
    if (!T)
        return NULL;
    Py_INCREF(S);
    T->owner = S;
    T->buf = (char *)S->pb.buf + TP_POOL_HEADER + (uint64_t)e->slot * S->slot_size;
    T->len = (Py_ssize_t)e->length;
    T->slot = e->slot;
    T->opcode = e->opcode;
    memcpy(T->data, e->data, sizeof T->data);
    T->seq = e->seq;
    T->dropped = gap;
    T->exports = 0;
    T->done = T->fired = 0;
    S->held++;
    return T;
}

static void ts_dealloc(TopicSampleObject *T)
{
    T->done = 1;
    ts_fire(T); /* never while an export lives: an export holds a reference to us */
    Py_DECREF(T->owner);
    PyObject_Free(T);
}

static PyObject *ts_release(TopicSampleObject *T, PyObject *unused)
{
    if (!T->done) {
        T->done = 1;
        if (T->exports == 0)
            ts_fire(T);
    }
    Py_RETURN_NONE;
}

static PyObject *ts_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *ts_exit(TopicSampleObject *T, PyObject *args)
{
    return ts_release(T, NULL);
}

static PyObject *ts_payload(TopicSampleObject *T, void *c)
{
    if (T->done) {
        PyErr_SetString(InvalidCapability ? InvalidCapability : PyExc_ValueError,
                        "this sample was released (keep a view of its payload from before, or "
                        "a copy)");
        return NULL;
    }
    return PyMemoryView_FromObject((PyObject *)T);
}

static PyObject *ts_data(TopicSampleObject *T, void *c)
{
    return Py_BuildValue("(KKKK)", (unsigned long long)T->data[0],
                         (unsigned long long)T->data[1], (unsigned long long)T->data[2],
                         (unsigned long long)T->data[3]);
}

static PyObject *ts_opcode(TopicSampleObject *T, void *c) { return PyLong_FromUnsignedLong(T->opcode); }
static PyObject *ts_seq(TopicSampleObject *T, void *c) { return PyLong_FromUnsignedLongLong(T->seq); }
static PyObject *ts_dropped(TopicSampleObject *T, void *c)
{
    return PyLong_FromUnsignedLongLong(T->dropped);
}
static PyObject *ts_publisher(TopicSampleObject *T, void *c)
{
    return PyLong_FromUnsignedLongLong(T->owner->publisher);
}
static PyObject *ts_released(TopicSampleObject *T, void *c) { return PyBool_FromLong(T->done); }

static PyObject *ts_repr(TopicSampleObject *T)
{
    return PyUnicode_FromFormat("<capbus.Sample seq=%llu opcode=%u from %llu dropped=%llu>",
                                (unsigned long long)T->seq, T->opcode,
                                (unsigned long long)T->owner->publisher,
                                (unsigned long long)T->dropped);
}

static PyMethodDef ts_methods[] = {
    {"release", (PyCFunction)ts_release, METH_NOARGS,
     "release(): done with it; its slot is reused once no view of its payload is left"},
    {"__enter__", (PyCFunction)ts_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)ts_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ts_getset[] = {
    {"payload", (getter)ts_payload, NULL,
     "a read-only memoryview of the publisher's memory (no copy)", NULL},
    {"opcode", (getter)ts_opcode, NULL, "the publisher's opcode", NULL},
    {"data", (getter)ts_data, NULL, "the four data words", NULL},
    {"seq", (getter)ts_seq, NULL, "the publisher's sequence number (1, 2, ...)", NULL},
    {"dropped", (getter)ts_dropped, NULL, "samples this subscriber lost just before it", NULL},
    {"publisher", (getter)ts_publisher, NULL, "the publisher's ProcessId (kernel-verified)", NULL},
    {"released", (getter)ts_released, NULL, "release() was called", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TopicSampleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus.Sample",
    .tp_basicsize = sizeof(TopicSampleObject),
    .tp_dealloc = (destructor)ts_dealloc,
    .tp_repr = (reprfunc)ts_repr,
    .tp_as_buffer = &ts_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = ts_methods,
    .tp_getset = ts_getset,
    .tp_doc = "One received topic sample: .payload (a read-only view of the publisher's memory, "
              "no copy), .opcode, .data, .publisher (kernel-verified ProcessId), .seq, "
              ".dropped; release() or a with block gives it back (views stay valid; the slot is "
              "reused only once the last is gone).",
};
