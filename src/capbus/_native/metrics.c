/*
 * _native/metrics.c: The metrics reader: channel_stats(buf), from a header page the peer may write
 * (every number untrusted, read once). GIL held.
 * Not compiled alone: module.c and layout_module.c (capbus._layout) #include it (see there).
 */

/* Copy n u64 out of a buffer the peer may write: RELAXED atomic loads when aligned (each value
 * untorn), else a plain copy (a torn number is still just a number). */
static void load_u64s(uint64_t *dst, const char *src, size_t n)
{
    if ((uintptr_t)src % 8 == 0) {
        for (size_t i = 0; i < n; i++)
            dst[i] = __atomic_load_n((const uint64_t *)src + i, __ATOMIC_RELAXED);
    } else {
        memcpy(dst, src, n * 8);
    }
}

/* The count of the whole second before now, from a (sec_index, sec_count, prev_count) bucket. */
static uint64_t last_second(const uint64_t *blk, uint64_t now_sec)
{
    uint64_t idx = blk[STATS_SEC_INDEX_OFF / 8];
    if (idx == now_sec)
        return blk[STATS_PREV_COUNT_OFF / 8];
    if (idx != UINT64_MAX && idx + 1 == now_sec)
        return blk[STATS_SEC_COUNT_OFF / 8];
    return 0;
}

static int dict_u64(PyObject *d, const char *key, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int r = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return r;
}

/* channel_stats(buf) -> dict: both metrics blocks of a channel header page, from any buffer of
 * at least CHAN_SSTATS_OFF + SSTATS_SIZE bytes. The numbers are whatever is there (untrusted):
 * nothing is indexed or sized with them. */
static PyObject *py_channel_stats(PyObject *self, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((size_t)v.len < CHAN_SSTATS_OFF + SSTATS_SIZE) {
        PyErr_Format(PyExc_ValueError, "a channel header page has %u bytes, got %zd",
                     CHAN_HEADER_SIZE, v.len);
        PyBuffer_Release(&v);
        return NULL;
    }
    uint64_t c[CSTATS_SIZE / 8], sv[SSTATS_SIZE / 8], refused;
    load_u64s(c, (const char *)v.buf + CHAN_CSTATS_OFF, CSTATS_SIZE / 8);
    load_u64s(sv, (const char *)v.buf + CHAN_SSTATS_OFF, SSTATS_SIZE / 8);
    load_u64s(&refused, (const char *)v.buf + CHAN_REFUSED_OFF, 1);
    PyBuffer_Release(&v);
    /* CLOCK_MONOTONIC, not coarse: the writers' seconds (either clock) are never ahead of it. */
    uint64_t now_sec = now_ns() / 1000000000ull;
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    static const struct {
        const char *key;
        int server;
        unsigned off;
    } fields[] = {
        {"sent", 0, CSTATS_SENT_OFF},
        {"bytes_sent", 0, CSTATS_BYTES_SENT_OFF},
        {"calls", 0, CSTATS_CALLS_OFF},
        {"timeouts", 0, CSTATS_TIMEOUTS_OFF},
        {"refused_rate", 0, CSTATS_REFUSED_RATE_OFF},
        {"refused_size", 0, CSTATS_REFUSED_SIZE_OFF},
        {"refused_perm", 0, CSTATS_REFUSED_PERM_OFF},
        {"latency_max_ns", 0, CSTATS_LATENCY_MAX_OFF},
        {"latency_sum_ns", 0, CSTATS_LATENCY_SUM_OFF},
        {"latency_count", 0, CSTATS_LATENCY_COUNT_OFF},
        {"received", 1, SSTATS_RECEIVED_OFF},
        {"bytes_received", 1, SSTATS_BYTES_RECEIVED_OFF},
        {"replies", 1, SSTATS_REPLIES_OFF},
        {"reply_failed", 1, SSTATS_REPLY_FAILED_OFF},
        {"drops_rate", 1, SSTATS_DROPS_RATE_OFF},
        {"drops_bandwidth", 1, SSTATS_DROPS_BANDWIDTH_OFF},
        {"drops_size", 1, SSTATS_DROPS_SIZE_OFF},
        {"drops_expired", 1, SSTATS_DROPS_EXPIRED_OFF},
        {"drops_rights", 1, SSTATS_DROPS_RIGHTS_OFF},
        {"cancelled", 1, SSTATS_CANCELLED_OFF},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (dict_u64(d, fields[i].key, (fields[i].server ? sv : c)[fields[i].off / 8]) < 0)
            goto fail;
    if (dict_u64(d, "refused_wouldblock", refused) < 0 ||
        dict_u64(d, "sent_last_second", last_second(c, now_sec)) < 0 ||
        dict_u64(d, "received_last_second", last_second(sv, now_sec)) < 0)
        goto fail;
    PyObject *hist = PyList_New(STATS_HIST_BUCKETS);
    if (!hist)
        goto fail;
    for (unsigned i = 0; i < STATS_HIST_BUCKETS; i++) {
        PyObject *o = PyLong_FromUnsignedLongLong(c[CSTATS_HIST_OFF / 8 + i]);
        if (!o) {
            Py_DECREF(hist);
            goto fail;
        }
        PyList_SET_ITEM(hist, i, o);
    }
    int r = PyDict_SetItemString(d, "hist", hist);
    Py_DECREF(hist);
    if (r < 0)
        goto fail;
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_CHANNEL_STATS \
    {"channel_stats", py_channel_stats, METH_O, \
        "channel_stats(buf) -> dict: the client and server metrics of a channel header page"}
