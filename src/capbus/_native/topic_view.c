/*
 * _native/topic_view.c: SampleView, the exporter behind a topic sample's payload (a subscriber's
 * read-only view of a pool slot) and a publisher's loan (its writable view), which counts its
 * exports so that a slot is reused only once no view of it is left. GIL held; not on the
 * per-sample hot path beyond one object per sample.
 * Trust: the memory it points into is a pool slot of a topic; the bounds (offset, length) come
 * from the runtime, which has checked them against the pool's size (the publisher's values are
 * untrusted there, never here). It never reads the memory.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- SampleView ------------------------------------------------------------------------------
 * The same export rule as ZBuf (zbuf.c): every memoryview made from one of its memoryviews
 * (slices, casts) shares its managed buffer, which holds one export until the last of those
 * views is gone. The owner says done() when the sample is released; on_free(arg) is called
 * exactly once, when it is done AND no export is left (or when the object is deallocated), and
 * from then on the view refuses new exports (its slot may hold another sample). on_free is handed
 * in by the runtime at construction (a bound method: C never names a Python method). */

typedef struct {
    PyObject_HEAD
    Py_buffer base;      /* the whole mapping, held: the mapping stays while we live */
    char *buf;
    Py_ssize_t len;
    int readonly;
    int done;            /* the owner released the sample */
    int fired;           /* on_free was called: no new export */
    Py_ssize_t exports;
    PyObject *on_free;
    PyObject *arg;
} SampleViewObject;

static PyTypeObject SampleViewType;

static void sv_fire(SampleViewObject *V)
{
    if (V->fired)
        return;
    V->fired = 1;
    PyObject *cb = V->on_free, *arg = V->arg;
    V->on_free = V->arg = NULL;
    if (cb) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb); /* may run while an exception is being raised */
        PyObject *r = PyObject_CallOneArg(cb, arg ? arg : Py_None);
        if (!r)
            PyErr_WriteUnraisable(cb);
        Py_XDECREF(r);
        PyErr_Restore(et, ev, tb);
    }
    Py_XDECREF(cb);
    Py_XDECREF(arg);
}

static int sv_getbuf(SampleViewObject *V, Py_buffer *view, int flags)
{
    if (V->fired) {
        view->obj = NULL;
        PyErr_SetString(PyExc_BufferError,
                        "this sample was released and its last view dropped: its slot may hold "
                        "another sample now (keep a view, or a copy, while you need the bytes)");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)V, V->buf, V->len, V->readonly, flags) < 0)
        return -1;
    V->exports++;
    return 0;
}

static void sv_releasebuf(SampleViewObject *V, Py_buffer *view)
{
    if (--V->exports == 0 && V->done)
        sv_fire(V);
}

static PyBufferProcs sv_as_buffer = {(getbufferproc)sv_getbuf, (releasebufferproc)sv_releasebuf};

static PyObject *sv_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mapping", "offset", "length", "readonly", "on_free", "arg", NULL};
    PyObject *mapping, *on_free, *arg;
    Py_ssize_t off, len;
    int readonly;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnnpOO", kwlist, &mapping, &off, &len, &readonly,
                                     &on_free, &arg))
        return NULL;
    if (!PyCallable_Check(on_free)) {
        PyErr_SetString(PyExc_TypeError, "on_free must be callable");
        return NULL;
    }
    SampleViewObject *V = (SampleViewObject *)type->tp_alloc(type, 0);
    if (!V)
        return NULL;
    if (PyObject_GetBuffer(mapping, &V->base, readonly ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0) {
        Py_DECREF(V);
        return NULL;
    }
    if (off < 0 || len < 0 || off > V->base.len || len > V->base.len - off) {
        PyErr_Format(PyExc_ValueError, "a view of %zd bytes at %zd does not fit a mapping of %zd",
                     len, off, V->base.len);
        Py_DECREF(V); /* releases base */
        return NULL;
    }
    V->buf = (char *)V->base.buf + off;
    V->len = len;
    V->readonly = readonly;
    Py_INCREF(on_free);
    Py_INCREF(arg);
    V->on_free = on_free;
    V->arg = arg;
    return (PyObject *)V;
}

static void sv_dealloc(SampleViewObject *V)
{
    sv_fire(V); /* never fired while an export lives: a live export holds a reference to us */
    if (V->base.obj)
        PyBuffer_Release(&V->base);
    Py_TYPE(V)->tp_free((PyObject *)V);
}

static PyObject *sv_done(SampleViewObject *V, PyObject *unused)
{
    V->done = 1;
    if (V->exports == 0)
        sv_fire(V);
    Py_RETURN_NONE;
}

static PyObject *sv_get_exports(SampleViewObject *V, void *c)
{
    return PyLong_FromSsize_t(V->exports);
}

static PyObject *sv_get_fired(SampleViewObject *V, void *c)
{
    return PyBool_FromLong(V->fired);
}

static PyMethodDef sv_methods[] = {
    {"done", (PyCFunction)sv_done, METH_NOARGS,
     "done(): the sample is released; on_free runs now, or when the last view goes"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sv_getset[] = {
    {"exports", (getter)sv_get_exports, NULL, "live exports (views) of this sample", NULL},
    {"freed", (getter)sv_get_fired, NULL, "on_free has run: the slot is given back", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SampleViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.SampleView",
    .tp_basicsize = sizeof(SampleViewObject),
    .tp_dealloc = (destructor)sv_dealloc,
    .tp_as_buffer = &sv_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = sv_new,
    .tp_methods = sv_methods,
    .tp_getset = sv_getset,
    .tp_doc = "SampleView(mapping, offset, length, readonly, on_free, arg): one topic sample's "
              "memory; on_free(arg) once it is done() and no view of it is left.",
};
