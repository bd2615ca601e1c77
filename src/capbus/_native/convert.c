/*
 * _native/convert.c: Parsing arguments on the hot path: fast_args, flags, data, payloads,
 * timeouts, and turning a received payload into bytes. GIL held. HOT functions are on a round
 * trip.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Parsing arguments. --------------------------------------------------------------------- */

/* Parse a METH_FASTCALL | METH_KEYWORDS call into out[i] (NULL when not given) by position or by
 * name; names is NULL-terminated and the first nreq are required. No allocation. */
static HOT int fast_args_n(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, PyObject **seen, int nnames,
                       int nreq, PyObject **out);

/* names is a NULL-terminated static array: its length is known at compile time. Each call site
 * gets its own `seen` table (see fast_args_n), static, so zeroed and kept for the process. */
#define fast_args(fname, args, nargs, kwnames, names, nreq, out)                                  \
    __extension__({                                                                              \
        static PyObject *kw_seen_[sizeof(names) / sizeof((names)[0])];                           \
        fast_args_n(fname, args, nargs, kwnames, names, kw_seen_,                                \
                    (int)(sizeof(names) / sizeof((names)[0])) - 1, nreq, out);                   \
    })

/* Is keyword `key` the name `name`? (kw_index's slow path.) Keyword names are compact ASCII
 * strings in practice: compare the bytes (PyUnicode_CompareWithASCIIString costs ~10 ns a name). */
static HOT inline int kw_is(PyObject *key, const char *name)
{
    if (PyUnicode_Check(key) && PyUnicode_IS_COMPACT_ASCII(key)) {
        size_t n = (size_t)PyUnicode_GET_LENGTH(key);
        return strlen(name) == n && memcmp(PyUnicode_DATA(key), name, n) == 0;
    }
    return PyUnicode_CompareWithASCIIString(key, name) == 0;
}

/* Which of names[] is keyword `key`, or nnames. A call site's keyword names are interned strings
 * (the compiler's constants), the same object at every call: seen[j] remembers the one that last
 * matched names[j] (holding a reference, so that its address cannot come back as another string),
 * and a pointer compare finds it without reading a byte (a timed spin call, `timeout=` being the
 * sixth name of call(), spent ~270 instructions on the byte compares). Only interned keys are
 * remembered: a **kwargs dict's keys may be fresh objects each time. */
static HOT inline int kw_index(PyObject *key, const char *const *names, PyObject **seen,
                               int nnames)
{
    for (int j = 0; j < nnames; j++)
        if (seen[j] == key)
            return j;
    int j = 0;
    while (j < nnames && !kw_is(key, names[j]))
        j++;
    if (j < nnames && PyUnicode_CheckExact(key) && PyUnicode_CHECK_INTERNED(key)) {
        Py_INCREF(key);
        Py_XSETREF(seen[j], key);
    }
    return j;
}

static HOT int fast_args_n(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, PyObject **seen, int nnames,
                       int nreq, PyObject **out)
{
    /* The common case: all positional, no keywords. */
    if (!kwnames && nargs >= nreq && nargs <= nnames) {
        for (int i = 0; i < nnames; i++)
            out[i] = i < nargs ? args[i] : NULL;
        return 0;
    }
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, nnames,
                     nargs);
        return -1;
    }
    for (int i = 0; i < nnames; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = kw_index(key, names, seen, nnames);
        if (j == nnames) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname, key);
            return -1;
        }
        if (out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[j]);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < nreq; i++) {
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* Flags a caller may pass. FLAG_LARGE, FLAG_REPLY_EXPECTED and FLAG_LOANED are decided here (by
 * payload size, call vs send, loan or not) and silently replaced, so a received flags value can
 * be echoed. */
static HOT int parse_flags(PyObject *o, uint32_t *flags, uint32_t extra)
{
    uint32_t f;
    if (to_u32(o, &f, "flags") < 0)
        return -1;
    /* The priority bits are the runtime's (prio_stamp), never the caller's: unknown here. */
    const uint32_t prio = FLAG_PRIO | FLAG_PRIO_RR | FLAG_PRIO_MASK;
    if (f & ~(FLAG_KNOWN_MASK & ~prio)) {
        PyErr_Format(PyExc_ValueError, "unknown flag bits 0x%x", f & ~(FLAG_KNOWN_MASK & ~prio));
        return -1;
    }
    *flags = (f & ~(FLAG_LARGE | FLAG_REPLY_EXPECTED | FLAG_LOANED)) | extra;
    return 0;
}

/* data: a tuple or list of up to four u64, zero-padded. Items are ints or anything with
 * __index__ (numpy integers). Converting an int runs no Python code; __index__ may, and may
 * change a list under us, so a list holding anything but ints is read through a tuple copy. */
static HOT int parse_data(PyObject *o, uint64_t d[4])
{
    PyObject **items;
    Py_ssize_t n;
    if (PyTuple_Check(o)) {
        items = ((PyTupleObject *)o)->ob_item;
        n = PyTuple_GET_SIZE(o);
    } else if (PyList_Check(o)) {
        items = ((PyListObject *)o)->ob_item;
        n = PyList_GET_SIZE(o);
        for (Py_ssize_t i = 0; i < n && i < 5; i++) {
            if (!PyLong_Check(items[i])) {
                PyObject *t = PyList_AsTuple(o);
                if (!t)
                    return -1;
                int r = parse_data(t, d);
                Py_DECREF(t);
                return r;
            }
        }
    } else {
        PyErr_Format(PyExc_TypeError, "data must be a tuple or list of up to 4 ints, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    if (n > 4) {
        PyErr_Format(PyExc_ValueError, "data carries at most 4 values, got %zd", n);
        return -1;
    }
    Py_ssize_t i = 0;
    for (; i < n; i++)
        if (to_u64(items[i], &d[i], "data values") < 0)
            return -1;
    for (; i < 4; i++)
        d[i] = 0;
    return 0;
}

/* A payload that is not one contiguous run of bytes: say what is wanted (BufferError from numpy
 * for a non-contiguous array, TypeError for a str or an int). */
static int payload_type_error(PyObject *o)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_Format(PyExc_TypeError,
                 "payload must be a contiguous bytes-like object (bytes, bytearray, memoryview, a "
                 "C-contiguous numpy array) or None, not %.100s%s",
                 Py_TYPE(o)->tp_name,
                 PyObject_CheckBuffer(o) ? " that is not contiguous (copy it, e.g. np.ascontiguousarray)"
                                         : "");
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
    return -1;
}

/* timeout (seconds, None = no deadline) -> ns, -1 for none: as endpoint.timeout_ns(). */
static HOT int front_timeout(PyObject *o, int64_t *out)
{
    *out = -1;
    if (!o || o == Py_None)
        return 0;
    if (PyLong_CheckExact(o)) { /* timeout=10: no float made (PyFloat_AsDouble would allocate) */
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (!overflow && v >= 0 && v < 9000000000ll) {
            *out = (int64_t)v * 1000000000ll;
            return 0;
        }
        if (overflow > 0 || (!overflow && v >= 0))
            return 0; /* beyond ~285 years: no deadline */
        if (PyErr_Occurred())
            return -1;
        PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
        return -1;
    }
    double t = PyFloat_AsDouble(o);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (!(t >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
        return -1;
    }
    if (t * 1e9 < 9.2e18) /* beyond ~292 years: no deadline */
        *out = (int64_t)(t * 1e9);
    return 0;
}

/* Take the payload buffer (None = no payload) and finish the flags. view->obj == NULL if none.
 * With empty_is_none, an empty payload is no payload (replies: saves the arena chunk). */
static HOT int parse_payload(PyObject *o, outmsg_t *m, Py_buffer *view, uint64_t max_payload,
                         int empty_is_none)
{
    view->obj = NULL;
    m->payload = NULL;
    m->plen = 0;
    if (o == Py_None || (empty_is_none && PyBytes_CheckExact(o) && PyBytes_GET_SIZE(o) == 0)) {
        m->flags &= ~(FLAG_CHECKSUM | FLAG_LARGE);
        return 0;
    }
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) < 0) {
        view->obj = NULL;
        return payload_type_error(o);
    }
    if (empty_is_none && view->len == 0) {
        PyBuffer_Release(view);
        view->obj = NULL;
        m->flags &= ~(FLAG_CHECKSUM | FLAG_LARGE);
        return 0;
    }
    if ((uint64_t)view->len > max_payload) {
        PyErr_Format(MessageTooLarge, "payload of %zd bytes exceeds the maximum of %llu bytes",
                     view->len, (unsigned long long)max_payload);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    static const uint8_t empty[1] = {0};
    m->payload = view->len ? (const uint8_t *)view->buf : empty;
    m->plen = (uint64_t)view->len;
    if (m->plen > LM_INLINE_SIZE)
        m->flags |= FLAG_LARGE;
    return 0;
}

static inline void release_view(Py_buffer *v)
{
    if (v->obj)
        PyBuffer_Release(v);
    v->obj = NULL;
}

static inline int to_i64_timeout(PyObject *o, int64_t *out)
{
    if (!o || o == Py_None) {
        *out = -1;
        return 0;
    }
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* Copy a received payload into a new bytes object (GIL held; the copy itself runs without the
 * GIL when big). NULL with an exception, or sets *corrupt_why and returns NULL with no
 * exception on a checksum mismatch. */
static PyObject *take_payload(cons_t *c, const inmsg_t *m, const char **corrupt_why)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)m->plen);
    if (!b)
        return NULL;
    int r;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(b);
    if (m->plen >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = cons_copy_payload(c, m, dst, corrupt_why);
        Py_END_ALLOW_THREADS
    } else {
        r = cons_copy_payload(c, m, dst, corrupt_why);
    }
    if (r != RG_OK) {
        Py_DECREF(b);
        return NULL;
    }
    return b;
}
