/*
 * _native/primitives.c: Part A of the module: futex and atomics on any buffer-protocol object at
 * an offset (what the kernel and tests use), and the u32/u64 argument conversions. GIL held; the
 * waits let it go.
 * Not compiled alone: module.c and layout_module.c (capbus._layout) #include it (see there).
 */

/* ---------------------------------------------------------------------------------------------
 * Part A: primitives on a buffer at an offset.
 * ------------------------------------------------------------------------------------------- */

/* Get a buffer view and a pointer to `size` naturally aligned bytes at `off`. */
static int get_word(PyObject *obj, Py_buffer *view, Py_ssize_t off, size_t size, int writable,
                    void **out)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        /* Exporters disagree on the error for a read-only buffer (mmap and bytes say BufferError);
         * always say TypeError, like writing to a read-only memoryview does. */
        if (writable && PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "buffer is read-only; this operation writes to it");
        }
        return -1;
    }
    if (off < 0 || (size_t)off > (size_t)view->len || (size_t)view->len - (size_t)off < size) {
        PyErr_Format(PyExc_ValueError, "offset %zd out of range for a buffer of %zd bytes", off,
                     view->len);
        goto fail;
    }
    char *p = (char *)view->buf + off;
    if ((uintptr_t)p % size != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zu-byte aligned", off, size);
        goto fail;
    }
    *out = p;
    return 0;
fail:
    PyBuffer_Release(view);
    return -1;
}

/* An exact int of at most one internal digit (0 <= v < 2**30: opcodes, data words, flags)
 * read in place, without a call into the interpreter: 1, or 0 for anything else. */
static inline int small_u64(PyObject *o, uint64_t *out)
{
    if (!PyLong_CheckExact(o))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o))
        return 0;
    Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
    if (v < 0)
        return 0;
    *out = (uint64_t)v;
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o); /* digits, negative for a negative number */
    if (size == 0 || size == 1) {
        *out = size ? ((PyLongObject *)o)->ob_digit[0] : 0;
        return 1;
    }
    return 0;
#endif
}

/* Python int -> u64 / u32 with a ValueError (not OverflowError) when out of range. */
static int to_u64_slow(PyObject *o, uint64_t *out, const char *what);

static inline int to_u64(PyObject *o, uint64_t *out, const char *what)
{
    return small_u64(o, out) ? 0 : to_u64_slow(o, out, what);
}

static int to_u64_slow(PyObject *o, uint64_t *out, const char *what)
{
    if (!PyLong_Check(o)) {
        /* An integer of another type (numpy.int64, anything with __index__; never a float). */
        PyNumberMethods *nb = Py_TYPE(o)->tp_as_number;
        if (!nb || !nb->nb_index) {
            PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                         Py_TYPE(o)->tp_name);
            return -1;
        }
        PyObject *i = PyNumber_Index(o);
        if (!i)
            return -1;
        int r = to_u64_slow(i, out, what);
        Py_DECREF(i);
        return r;
    }
    /* Negative and too-large values both raise OverflowError here; report them as ValueError.
     * On LP64 PyLong_AsUnsignedLong is the same conversion without CPython's byte-array detour
     * for values above 2**30 (capability handles, most of all). */
#if ULONG_MAX == UINT64_MAX
    unsigned long long v = PyLong_AsUnsignedLong(o);
#else
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
#endif
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in 0..2**64-1", what);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static inline int to_u32(PyObject *o, uint32_t *out, const char *what)
{
    uint64_t v;
    if (small_u64(o, &v)) { /* < 2**30 on every build: fits */
        *out = (uint32_t)v;
        return 0;
    }
    if (to_u64_slow(o, &v, what) < 0)
        return -1;
    if (v > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must be in 0..2**32-1", what);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static PyObject *py_futex_wait(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "offset", "expected", "timeout", NULL};
    PyObject *obj, *exp_o, *timeout_o = Py_None;
    Py_ssize_t off;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO|O:futex_wait", kwlist, &obj, &off, &exp_o,
                                     &timeout_o))
        return NULL;
    uint32_t expected;
    if (to_u32(exp_o, &expected, "expected") < 0)
        return NULL;
    int forever = timeout_o == Py_None;
    uint64_t deadline = 0;
    if (!forever) {
        double t = PyFloat_AsDouble(timeout_o);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (isnan(t)) {
            PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
            return NULL;
        }
        if (t < 0)
            t = 0;
        if (t > 1e9) /* ~31 years: treat as forever rather than overflow the deadline */
            forever = 1;
        else
            deadline = now_ns() + (uint64_t)(t * 1e9);
    }
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 0, &p) < 0)
        return NULL;
    /* A value that already differs answers True even with a zero timeout, exactly as the
     * kernel's FUTEX_WAIT would (EAGAIN). Acquire: a caller that sees the new value may go on to
     * read data published before it. */
    if (__atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE) != expected) {
        PyBuffer_Release(&view);
        Py_RETURN_TRUE;
    }
    int r;
    for (;;) {
        uint64_t rel = 0;
        if (!forever) {
            uint64_t now = now_ns();
            if (now >= deadline) {
                r = -ETIMEDOUT;
                break;
            }
            rel = deadline - now;
        }
        /* The buffer export (view) keeps the mapping alive while we sleep without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        r = sys_futex_wait((const uint32_t *)p, expected, rel, forever);
        Py_END_ALLOW_THREADS
        if (r != -EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    if (r == 0 || r == -EAGAIN)
        Py_RETURN_TRUE;
    if (r == -ETIMEDOUT)
        Py_RETURN_FALSE;
    errno = -r;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *py_futex_wake(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "offset", "n", NULL};
    PyObject *obj;
    Py_ssize_t off;
    int n = INT_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "On|i:futex_wake", kwlist, &obj, &off, &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 0, &p) < 0)
        return NULL;
    int r = sys_futex_wake((const uint32_t *)p, n);
    PyBuffer_Release(&view);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}

/* The Python-level atomics are all seq_cst: they are used for rare control-plane work (the kernel
 * flipping a state word, tests poking at rings) where the cost is irrelevant and the strongest
 * order means no caller ever has to reason about which order they got. */

static PyObject *py_atomic_load_u32(PyObject *self, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "On:atomic_load_u32", &obj, &off))
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 0, &p) < 0)
        return NULL;
    uint32_t v = __atomic_load_n((uint32_t *)p, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *py_atomic_load_u64(PyObject *self, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "On:atomic_load_u64", &obj, &off))
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 0, &p) < 0)
        return NULL;
    uint64_t v = __atomic_load_n((uint64_t *)p, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *py_atomic_store_u32(PyObject *self, PyObject *args)
{
    PyObject *obj, *vo;
    Py_ssize_t off;
    uint32_t v;
    if (!PyArg_ParseTuple(args, "OnO:atomic_store_u32", &obj, &off, &vo))
        return NULL;
    if (to_u32(vo, &v, "value") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 1, &p) < 0)
        return NULL;
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *py_atomic_store_u64(PyObject *self, PyObject *args)
{
    PyObject *obj, *vo;
    Py_ssize_t off;
    uint64_t v;
    if (!PyArg_ParseTuple(args, "OnO:atomic_store_u64", &obj, &off, &vo))
        return NULL;
    if (to_u64(vo, &v, "value") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 1, &p) < 0)
        return NULL;
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *py_atomic_cas_u32(PyObject *self, PyObject *args)
{
    PyObject *obj, *eo, *dof;
    Py_ssize_t off;
    uint32_t e, d;
    if (!PyArg_ParseTuple(args, "OnOO:atomic_cas_u32", &obj, &off, &eo, &dof))
        return NULL;
    if (to_u32(eo, &e, "expected") < 0 || to_u32(dof, &d, "desired") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 1, &p) < 0)
        return NULL;
    /* seq_cst on success and failure: see comment above. */
    int ok = __atomic_compare_exchange_n((uint32_t *)p, &e, d, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_cas_u64(PyObject *self, PyObject *args)
{
    PyObject *obj, *eo, *dof;
    Py_ssize_t off;
    uint64_t e, d;
    if (!PyArg_ParseTuple(args, "OnOO:atomic_cas_u64", &obj, &off, &eo, &dof))
        return NULL;
    if (to_u64(eo, &e, "expected") < 0 || to_u64(dof, &d, "desired") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 1, &p) < 0)
        return NULL;
    /* seq_cst on success and failure: see comment above. */
    int ok = __atomic_compare_exchange_n((uint64_t *)p, &e, d, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_add_u64(PyObject *self, PyObject *args)
{
    PyObject *obj, *vo;
    Py_ssize_t off;
    uint64_t v;
    if (!PyArg_ParseTuple(args, "OnO:atomic_add_u64", &obj, &off, &vo))
        return NULL;
    if (to_u64(vo, &v, "value") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 1, &p) < 0)
        return NULL;
    /* Wraps modulo 2**64 like the hardware does; seq_cst: see comment above. */
    uint64_t old = __atomic_fetch_add((uint64_t *)p, v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(old);
}

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_FUTEX_WAKE \
    {"futex_wake", (PyCFunction)(void (*)(void))py_futex_wake, METH_VARARGS | METH_KEYWORDS, \
        "futex_wake(buf, offset, n=INT_MAX) -> int\n\nWake up to n waiters; returns how many."}

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_ATOMIC_STORE_U32 \
    {"atomic_store_u32", py_atomic_store_u32, METH_VARARGS, "atomic_store_u32(buf, off, v)"}

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_ATOMIC_STORE_U64 \
    {"atomic_store_u64", py_atomic_store_u64, METH_VARARGS, "atomic_store_u64(buf, off, v)"}
