/*
 * _native/helpers.c: Module-level helpers for the kernel: channel geometry (check_geometry, which
 * Lane and ServerSet use too; channel_size, resp_ring_off, max_payload) and latency_clock. Tests
 * build channels as the kernel does (capbus._kernel.shm), so there is no entry point here for
 * them alone. GIL held. Needs layout.h and clock.h only.
 * Not compiled alone: module.c and layout_module.c (capbus._layout) #include it (see there).
 */

/* ---------------------------------------------------------------------------------------------
 * Module-level helpers for the kernel.
 * ------------------------------------------------------------------------------------------- */

static int check_geometry(uint64_t nslots, uint64_t asize)
{
    if (nslots < MIN_NSLOTS || nslots > MAX_NSLOTS || (nslots & (nslots - 1))) {
        PyErr_Format(PyExc_ValueError, "nslots must be a power of two in %u..%u", MIN_NSLOTS,
                     MAX_NSLOTS);
        return -1;
    }
    if (asize < MIN_ARENA_SIZE || asize > MAX_ARENA_SIZE || asize % PAGE_SIZE_) {
        PyErr_Format(PyExc_ValueError,
                     "arena_size must be a multiple of 4096 in %llu..%llu",
                     (unsigned long long)MIN_ARENA_SIZE, (unsigned long long)MAX_ARENA_SIZE);
        return -1;
    }
    return 0;
}

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

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_CHANNEL_SIZE \
    {"channel_size", (PyCFunction)(void (*)(void))py_channel_size, METH_VARARGS | METH_KEYWORDS, \
        "channel_size(nslots=256, arena_size=128 MiB) -> int: bytes of a channel memfd"}

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_RESP_RING_OFF \
    {"resp_ring_off", py_resp_ring_off, METH_O, \
        "resp_ring_off(nslots) -> int: offset of the response ring in a channel (its tail word, at\n" \
        "+RING_TAIL_OFF, is what clients futex-wait on: the kernel wakes it after changing a\n" \
        "control page)"}
