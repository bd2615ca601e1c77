/*
 * _native/helpers.c: Module-level helpers for the kernel and tests: channel geometry and layout,
 * sealed memfds (create_channel, create_page), wake_lane. GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---------------------------------------------------------------------------------------------
 * Module-level helpers for the kernel (and tests).
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

static PyObject *py_channel_layout(PyObject *self, PyObject *args, PyObject *kw)
{
    uint64_t n, a;
    if (parse_geometry(args, kw, "|KK:channel_layout", &n, &a) < 0)
        return NULL;
    uint64_t rq = REQ_RING_OFF, rs = resp_ring_off(n);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "size", channel_size(n, a), "nslots", n,
        "arena_size", a, "ring_size", ring_size(n), "cancel_below",
        (unsigned long long)CHAN_CANCEL_BELOW_OFF, "refused", (unsigned long long)CHAN_REFUSED_OFF,
        "resp_consumer_event", rs + RING_CONSUMER_EVENT_OFF, "req_ring", rq, "req_tail", rq + RING_TAIL_OFF,
        "req_head", rq + RING_HEAD_OFF, "req_arena_released", rq + RING_ARENA_RELEASED_OFF,
        "req_slots", rq + RING_SLOTS_OFF, "resp_ring", rs, "resp_tail", rs + RING_TAIL_OFF,
        "resp_head", rs + RING_HEAD_OFF, "resp_consumer_sleeping",
        rs + RING_CONSUMER_SLEEPING_OFF, "resp_arena_released", rs + RING_ARENA_RELEASED_OFF,
        "resp_slots", rs + RING_SLOTS_OFF, "req_arena", req_arena_off(n), "resp_arena",
        resp_arena_off(n, a), "cstats", (unsigned long long)CHAN_CSTATS_OFF, "sstats",
        (unsigned long long)CHAN_SSTATS_OFF);
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

/* A memfd sealed against shrinking and growing. `extra` adds seals: F_SEAL_SEAL for channels
 * (nobody may add seals later: a client adding F_SEAL_FUTURE_WRITE before the server maps the
 * channel would make add() fail), none for pages (the kernel seals a control page with
 * F_SEAL_FUTURE_WRITE once it has mapped it). */
static int new_sealed_memfd(const char *name, uint64_t size, int extra)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)size) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | extra) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static PyObject *py_create_channel(PyObject *self, PyObject *args, PyObject *kw)
{
    uint64_t n, a;
    if (parse_geometry(args, kw, "|KK:create_channel", &n, &a) < 0)
        return NULL;
    int fd = new_sealed_memfd("capbus-channel", channel_size(n, a), F_SEAL_SEAL);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* The informational header. pwrite, not a mapping: only the first page is touched. */
    unsigned char hdr[24];
    uint64_t magic = CHAN_MAGIC, asz = a;
    uint32_t ver = CHAN_VERSION, ns = (uint32_t)n;
    memcpy(hdr + CHAN_MAGIC_OFF, &magic, 8);
    memcpy(hdr + CHAN_VERSION_OFF, &ver, 4);
    memcpy(hdr + CHAN_NSLOTS_OFF, &ns, 4);
    memcpy(hdr + CHAN_ARENA_SIZE_OFF, &asz, 8);
    if (pwrite(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr) {
        int e = errno;
        close(fd);
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(fd);
}

static PyObject *py_create_page(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", NULL};
    const char *name = "capbus-page";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|s:create_page", kwlist, &name))
        return NULL;
    int fd = new_sealed_memfd(name, PAGE_SIZE_, 0);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

/* wake_lane(chan, nslots=256) -> int: futex_wake the response-tail word of a channel, i.e. every
 * client blocked in call() on it, after the kernel changed its control page. `chan` is the
 * channel memfd (int) or any buffer mapping the channel from offset 0 (at least up to the
 * response ring header). */
static PyObject *py_wake_lane(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"chan", "nslots", NULL};
    PyObject *chan;
    unsigned long long n = DEFAULT_NSLOTS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|K:wake_lane", kwlist, &chan, &n))
        return NULL;
    if (check_geometry(n, MIN_ARENA_SIZE) < 0)
        return NULL;
    uint64_t off = resp_ring_off(n) + RING_TAIL_OFF;
    int r;
    if (PyLong_Check(chan)) {
        int fd = (int)PyLong_AsLong(chan);
        if (fd == -1 && PyErr_Occurred())
            return NULL;
        size_t len = (size_t)round_up_u64(off + 8, PAGE_SIZE_);
        void *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            return PyErr_SetFromErrno(PyExc_OSError);
        r = sys_futex_wake((const uint32_t *)((char *)p + off), INT_MAX);
        munmap(p, len);
    } else {
        Py_buffer view;
        void *w;
        if (get_word(chan, &view, (Py_ssize_t)off, 4, 0, &w) < 0)
            return NULL;
        r = sys_futex_wake((const uint32_t *)w, INT_MAX);
        PyBuffer_Release(&view);
    }
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}
