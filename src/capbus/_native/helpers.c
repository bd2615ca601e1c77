/*
 * _native/helpers.c: Module-level helpers for the kernel: channel geometry (channel_size,
 * resp_ring_off, max_payload) and latency_clock. Tests build channels as the kernel does
 * (capbus._kernel.shm), so there is no entry point here for them alone. GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---------------------------------------------------------------------------------------------
 * Module-level helpers for the kernel.
 * ------------------------------------------------------------------------------------------- */

static int parse_geometry(PyObject *args, PyObject *kw, const char *fmt, uint64_t *n, uint64_t *a)
{
    static char *kwlist[] = {"nslots", "arena_size", NULL};
    unsigned long long nn = DEFAULT_NSLOTS, aa = DEFAULT_ARENA_SIZE;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &nn, &aa))
        return -1;
    if (check_geometry(nn, aa) < 0)
        return -1;
    *n = nn;
    *a = aa;
    return 0;
}

static PyObject *py_channel_size(PyObject *self, PyObject *args, PyObject *kw)
{
    uint64_t n, a;
    if (parse_geometry(args, kw, "|KK:channel_size", &n, &a) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(channel_size(n, a));
}

/* latency_clock() -> str: what a call's round trip for the metrics is measured with. */
static PyObject *py_latency_clock(PyObject *self, PyObject *unused)
{
    static const char *names[] = {"monotonic", "monotonic (tsc rate not measured yet)", "tsc"};
    return PyUnicode_FromString(names[tsc_state]);
}

static PyObject *py_resp_ring_off(PyObject *self, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (check_geometry(n, MIN_ARENA_SIZE) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(resp_ring_off(n));
}

static PyObject *py_max_payload(PyObject *self, PyObject *arg)
{
    unsigned long long a = PyLong_AsUnsignedLongLong(arg);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (check_geometry(DEFAULT_NSLOTS, a) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(max_payload_for(a));
}
