/*
 * capbus._core -- the native core of capbus: _native/module.c, its one translation unit.
 *
 * The Python-visible API (internal; only the capbus kernel, runtime and tests use it) is
 * described in src/capbus/_core.pyi, the contract of this module. This file holds the method
 * table, the module constants and PyInit; it #includes every part of _native/ in layer order
 * (a unity build: each part keeps its static functions, so the compiler sees one translation
 * unit and inlines across parts as before). Parts, bottom up:
 *   engine, no Python API: layout.h (every offset), limits.h (control-page reads, token
 *     buckets), crc32.h, ring.h (SPSC rings + FIFO arena), clock.h, futex.h, fence.h
 *   process-wide: errors.h (the _errors classes register() hands in, fork check), common.h
 *     (wait modes, tunables, contention), gil_lock.h, sleep.c (eventfds, kicks, the sleep watchdog)
 *   Python glue: primitives.c, mapping.c, helpers.c (channel geometry, for the kernel too),
 *     convert.c, objcache.h, metrics.h/.c, zbuf.c, zbuf_release.c, request.c, message.c,
 *     dumpable.c, topic_view.c (SampleView: a topic sample's views), topic.h (a topic's
 *     layout), topic_pub.c (TopicPub), topic_sample.c (Sample),
 *     topic_sub.c (TopicSub)
 *   one binding per type: lane*.c (Lane), serverset.h, ss_*.c, serverset.c (ServerSet),
 *     bases.c (EndpointBase, ServiceBase)
 * The trusted kernel imports none of this: capbus._layout (layout_module.c) is built from the few
 * parts it uses (layout.h, limits.h, clock.h, futex.h, primitives.c, helpers.c, metrics.c,
 * dumpable.c), the same files, so each definition stays one.
 * Where define-before-use forces an order, the part's .h has the forward declaration.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifdef Py_GIL_DISABLED
#error "capbus's native core relies on the GIL (gil_lock_t, free lists): no free-threaded CPython"
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* HOT: a function on the path of a call or a receive. GCC places these together (.text.hot), so
 * a round trip runs from 6 pages of this module's code instead of 13 spread over it: after each
 * context switch, fewer instruction-cache lines and TLB entries to refill. */
#define HOT __attribute__((hot))

#include "layout.h"
#include "limits.h"
#include "ring.h"

#include "errors.h"
#include "clock.h"
#include "futex.h"
#include "fence.h"
#include "primitives.c"
#include "common.h"
#include "mapping.c"
#include "helpers.c"
#include "convert.c"
#include "gil_lock.h"
#include "serverset.h"
#include "sleep.c"
#include "prio.c"
#include "objcache.h"
#include "metrics.h"
#include "zbuf.c"
#include "lane.h"
#include "lane_setup.c"
#include "lane_io.c"
#include "lane_loan.c"
#include "lane.c"
#include "ss_table.c"
#include "ss_wait.c"
#include "ss_reply.c"
#include "zbuf_release.c"
#include "message.h"
#include "request.c"
#include "message.c"
#include "ss_recv.c"
#include "serverset.c"
#include "bases.c"
#include "metrics.c"
#include "dumpable.c"
#include "topic_view.c"
#include "topic.h"
#include "topic_pub.c"
#include "topic_batch.c"
#include "topic_sample.c"
#include "topic_sub.c"

static PyObject *py_crc32(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32", &view, &value))
        return NULL;
    uint32_t c;
    if (view.len >= (Py_ssize_t)NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        c = crc32_update(value, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        c = crc32_update(value, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* register(*, errors, object_loads, object_pack): what this module needs of capbus's Python side,
 * handed in once by the runtime at import (capbus._runtime.message), so that no C code imports a
 * capbus module or looks a Python function up by name. errors: the capbus._errors module (its
 * classes are read here, once: a missing one fails now, not at the first error); object_loads /
 * object_pack: the object codec of Request.object()/reply_object() and Message.object(). Adds
 * CorruptChannel (a ProtocolError) to the module. A second call is refused: the classes are
 * baked into every error raised from here on. */
static PyObject *py_register(PyObject *module, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"errors", "object_loads", "object_pack", NULL};
    PyObject *errors = NULL, *loads = NULL, *pack = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOO:register", kwlist, &errors, &loads, &pack))
        return NULL;
    if (core_ready) {
        PyErr_SetString(PyExc_RuntimeError, "capbus._core.register() was called already");
        return NULL;
    }
    if (!errors || !loads || !pack || !PyCallable_Check(loads) || !PyCallable_Check(pack)) {
        PyErr_SetString(PyExc_TypeError, "register() needs errors=, and object_loads= and "
                                         "object_pack= callables");
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *name;
    } errs[] = {
        {&IpcError, "IpcError"},         {&Timeout, "Timeout"},
        {&PeerDied, "PeerDied"},         {&InvalidCapability, "InvalidCapability"},
        {&WouldBlock, "WouldBlock"},     {&MessageTooLarge, "MessageTooLarge"},
        {&ProtocolError, "ProtocolError"}, {&Cancelled, "Cancelled"},
        {&PermissionDenied, "PermissionDenied"}, {&RateLimitExceeded, "RateLimitExceeded"},
        {&KernelUnavailable, "KernelUnavailable"}, {&NoReply, "NoReply"},
    };
    enum { NERRS = sizeof errs / sizeof errs[0] };
    PyObject *cls[NERRS];
    uint64_t code[4];
    for (size_t i = 0; i < NERRS; i++) {
        cls[i] = PyObject_GetAttrString(errors, errs[i].name);
        if (cls[i] && !PyExceptionClass_Check(cls[i])) {
            PyErr_Format(PyExc_TypeError, "errors.%s is not an exception class", errs[i].name);
            Py_CLEAR(cls[i]);
        }
        if (!cls[i]) {
            while (i--)
                Py_DECREF(cls[i]);
            return NULL;
        }
    }
    /* The codes of the errors a server's automatic replies carry (InvalidCapability,
     * MessageTooLarge, RateLimitExceeded, NoReply: cls[3], [5], [9], [11]). */
    static const int coded[4] = {3, 5, 9, 11};
    for (size_t i = 0; i < 4; i++) {
        PyObject *c = PyObject_GetAttrString(cls[coded[i]], "code");
        int bad = !c || to_u64(c, &code[i], "error code") < 0;
        Py_XDECREF(c);
        if (bad) {
            for (size_t k = 0; k < NERRS; k++)
                Py_DECREF(cls[k]);
            return NULL;
        }
    }
    PyObject *corrupt = PyErr_NewExceptionWithDoc(
        "capbus._core.CorruptChannel",
        "A client wrote garbage into its channel. The ServerSet has marked the channel dead and "
        "will not read it again; .index is the channel index, .reason says what was wrong.",
        cls[6], NULL);
    if (!corrupt || PyModule_AddObjectRef(module, "CorruptChannel", corrupt) < 0) {
        Py_XDECREF(corrupt);
        for (size_t k = 0; k < NERRS; k++)
            Py_DECREF(cls[k]);
        return NULL;
    }
    for (size_t i = 0; i < NERRS; i++)
        *errs[i].slot = cls[i];
    code_invalid_capability = code[0];
    code_message_too_large = code[1];
    code_rate_limit = code[2];
    code_no_reply = code[3];
    CorruptChannel = corrupt;
    object_loads = Py_NewRef(loads);
    object_pack = Py_NewRef(pack);
    core_ready = 1;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * Module.
 * ------------------------------------------------------------------------------------------- */

static PyMethodDef core_methods[] = {
    {"futex_wait", (PyCFunction)(void (*)(void))py_futex_wait, METH_VARARGS | METH_KEYWORDS,
     "futex_wait(buf, offset, expected, timeout=None) -> bool\n\n"
     "Sleep on the u32 at buf[offset] while it equals `expected` (shared futex). True if woken\n"
     "or the value differed, False on timeout (seconds; None = forever)."},
    METHOD_FUTEX_WAKE,
    {"atomic_load_u32", py_atomic_load_u32, METH_VARARGS, "atomic_load_u32(buf, off) -> int"},
    {"atomic_load_u64", py_atomic_load_u64, METH_VARARGS, "atomic_load_u64(buf, off) -> int"},
    METHOD_ATOMIC_STORE_U32,
    METHOD_ATOMIC_STORE_U64,
    {"atomic_cas_u32", py_atomic_cas_u32, METH_VARARGS,
     "atomic_cas_u32(buf, off, expected, desired) -> bool"},
    {"atomic_cas_u64", py_atomic_cas_u64, METH_VARARGS,
     "atomic_cas_u64(buf, off, expected, desired) -> bool"},
    {"atomic_add_u64", py_atomic_add_u64, METH_VARARGS,
     "atomic_add_u64(buf, off, v) -> int (old value, wraps modulo 2**64)"},
    METHOD_CHANNEL_SIZE,
    {"max_payload", py_max_payload, METH_O, "max_payload(arena_size) -> int"},
    {"latency_clock", py_latency_clock, METH_NOARGS,
     "latency_clock() -> str: 'tsc' when calls time their round trips with the TSC (the kernel's\n"
     "clocksource is the TSC and its rate has been measured), else 'monotonic...'"},
    METHOD_RESP_RING_OFF,
    {"crc32", py_crc32, METH_VARARGS, "crc32(data, value=0) -> int (same as zlib.crc32)"},
    {"thread_priority", py_thread_priority, METH_NOARGS,
     "thread_priority() -> int: the calling thread's priority, read now (-nice, or 20 + its "
     "SCHED_FIFO/RR priority)"},
    {"refresh_priority", py_refresh_priority, METH_NOARGS,
     "refresh_priority(): the next call stamps the thread's priority read afresh (after "
     "os.setpriority / os.sched_setscheduler; otherwise seen within ~10 ms)"},
    {"restore_priority", py_restore_priority, METH_NOARGS,
     "restore_priority(): a thread running at a caller's priority (recv) goes back to its own"},
    METHOD_SET_DUMPABLE,
    {"register", (PyCFunction)(void (*)(void))py_register, METH_VARARGS | METH_KEYWORDS,
     "register(*, errors, object_loads, object_pack) -> None: what this module needs of\n"
     "capbus's Python side, handed in once by the runtime at import (errors: the capbus._errors\n"
     "module; object_loads(payload, trusted) and object_pack(obj, pickle): the object codec).\n"
     "Adds CorruptChannel. Lane, ServerSet, EndpointBase and ServiceBase refuse to be made\n"
     "before it; a second call is refused."},
    {"dumpable", py_dumpable, METH_NOARGS, "dumpable() -> bool   prctl(PR_GET_DUMPABLE) == 1"},
    METHOD_CHANNEL_STATS,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "capbus._core",
    "capbus native core (its API: src/capbus/_core.pyi).",
    -1, core_methods, NULL, NULL, NULL, NULL,
};

static int add_u64(PyObject *m, const char *name, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (!o || PyModule_AddObject(m, name, o) < 0) {
        Py_XDECREF(o);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__core(void)
{
    crc32_init();
    if (!tsc_state)
        tsc_init();
    if (small_ints_init() < 0)
        return NULL;
    static int atfork_done; /* once per process, however often this module is initialised */
    if (!atfork_done) {
        if (pthread_atfork(wd_lock, wd_unlock, wd_atfork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return NULL;
        }
        atfork_done = 1;
    }
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    empty_tuple = PyTuple_New(0);
    if (!empty_bytes || !empty_tuple)
        return NULL;
    MessageType.tp_base = &PyTuple_Type;
    if (PyType_Ready(&MessageType) < 0 || PyType_Ready(&LaneType) < 0 ||
        PyType_Ready(&ServerSetType) < 0 ||
        PyType_Ready(&RequestType) < 0 || PyType_Ready(&ZBufType) < 0 || PyType_Ready(&SampleViewType) < 0 ||
        PyType_Ready(&TopicPubType) < 0 || PyType_Ready(&TopicSubType) < 0 ||
        PyType_Ready(&TopicSampleType) < 0 ||
        PyType_Ready(&EndpointBaseType) < 0 || PyType_Ready(&ServiceBaseType) < 0)
        return NULL;
    if (!(int_zero = PyLong_FromLong(0)))
        return NULL;
    released_view = PyMemoryView_FromMemory((char *)"", 0, PyBUF_READ);
    if (!released_view)
        return NULL;
    PyObject *rel = PyObject_CallMethod(released_view, "release", NULL);
    if (!rel)
        return NULL;
    Py_DECREF(rel);
    if (!req_type) {
        Py_INCREF(&RequestType);
        req_type = &RequestType;
    }
    if (!msg_type) {
        Py_INCREF(&MessageType);
        msg_type = &MessageType;
    }

    PyObject *m = PyModule_Create(&core_module);
    if (!m)
        return NULL;
    Py_INCREF(&LaneType);
    Py_INCREF(&ServerSetType);
    Py_INCREF(&RequestType);
    Py_INCREF(&MessageType);
    if (PyModule_AddObject(m, "Message", (PyObject *)&MessageType) < 0 ||
        PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObject(m, "ServerSet", (PyObject *)&ServerSetType) < 0 ||
        PyModule_AddObject(m, "Request", (PyObject *)&RequestType) < 0)
        goto fail;
    Py_INCREF(&SampleViewType);
    Py_INCREF(&TopicPubType);
    Py_INCREF(&TopicSubType);
    Py_INCREF(&TopicSampleType);
    if (PyModule_AddObject(m, "SampleView", (PyObject *)&SampleViewType) < 0 ||
        PyModule_AddObject(m, "TopicPub", (PyObject *)&TopicPubType) < 0 ||
        PyModule_AddObject(m, "TopicSub", (PyObject *)&TopicSubType) < 0 ||
        PyModule_AddObject(m, "Sample", (PyObject *)&TopicSampleType) < 0)
        goto fail;
    Py_INCREF(&EndpointBaseType);
    Py_INCREF(&ServiceBaseType);
    if (PyModule_AddObject(m, "EndpointBase", (PyObject *)&EndpointBaseType) < 0 ||
        PyModule_AddObject(m, "ServiceBase", (PyObject *)&ServiceBaseType) < 0)
        goto fail;

    static const struct {
        const char *name;
        uint64_t v;
    } consts[] = {
#define C(x) {#x, (uint64_t)(x)}
        C(CTRL_SIZE), C(CTRL_STATE_OFF), C(CTRL_GENERATION_OFF), C(CTRL_EXPIRY_OFF),
        C(CTRL_MAX_MESSAGE_SIZE_OFF), C(CTRL_RATE_LIMIT_OFF), C(CTRL_BANDWIDTH_OFF),
        C(CTRL_RIGHTS_OFF), C(CTRL_FLAGS_OFF), C(CTRL_SENDER_ID_OFF), C(CTRL_F_ENFORCE),
        C(CTRL_CAP_ID_OFF), C(CTRL_CHAIN_LEN_OFF), C(CTRL_MAX_PRIORITY_OFF),
        C(PRIO_MAX), C(PRIO_CTRL_BIAS), C(PRIO_RT_BASE), C(CTRL_CHAIN_OFF), C(CTRL_CHAIN_ENTRY_SIZE),
        C(CTRL_CHAIN_MAX), C(BUCKET_IDLE_MAX),
        C(RIGHT_SEND), C(RIGHT_RECEIVE), C(RIGHT_SHARE), C(RIGHT_MAP), C(RIGHT_READ),
        C(RIGHT_WRITE),
        C(STATE_OPEN), C(STATE_REVOKED), C(STATE_PEER_DEAD), C(STATE_CLOSED),
        C(DOORBELL_SIZE), C(DB_SEQ_OFF), C(DB_SERVER_SLEEPING_OFF), C(DB_EVENT_WANTED_OFF),
        C(DB_SERVER_SPINS_OFF),
        C(DB_BITMAP_OFF),
        C(MAX_CHANNELS),
        C(CHAN_HEADER_SIZE), C(CHAN_MAGIC_OFF), C(CHAN_VERSION_OFF), C(CHAN_NSLOTS_OFF),
        C(CHAN_ARENA_SIZE_OFF), C(CHAN_CANCEL_BELOW_OFF), C(CHAN_REFUSED_OFF), C(CHAN_MAGIC),
        C(CHAN_VERSION), C(RING_TAIL_OFF), C(RING_HEAD_OFF), C(RING_CONSUMER_SLEEPING_OFF),
        C(RING_CONSUMER_EVENT_OFF), C(RING_PRODUCER_WAITING_OFF),
        C(RING_ARENA_RELEASED_OFF), C(RING_SLOTS_OFF), C(REQ_RING_OFF),
        C(DEFAULT_NSLOTS), C(MIN_NSLOTS), C(MAX_NSLOTS), C(DEFAULT_ARENA_SIZE),
        C(MIN_ARENA_SIZE), C(MAX_ARENA_SIZE),
        C(SLOT_SIZE), C(SMALL_MESSAGE_SIZE),
        {"SLOT_CAPABILITY_OFF", offsetof(slot_t, capability)},
        {"SLOT_OPCODE_OFF", offsetof(slot_t, opcode)},
        {"SLOT_FLAGS_OFF", offsetof(slot_t, flags)},
        {"SLOT_DATA_OFF", offsetof(slot_t, data)},
        {"SLOT_TAG_OFF", offsetof(slot_t, tag)},
        {"SLOT_PAYLOAD_LEN_OFF", offsetof(slot_t, payload_len)},
        {"SLOT_PAYLOAD_OFF_OFF", offsetof(slot_t, payload_off)},
        C(FLAG_LARGE), C(FLAG_CHECKSUM), C(FLAG_REPLY_EXPECTED), C(FLAG_ERROR), C(FLAG_LOANED), C(FLAG_IPC_ERROR),
        C(FLAG_USER_MASK), C(FLAG_KNOWN_MASK), C(FLAG_PRIO), C(FLAG_PRIO_RR), C(FLAG_PRIO_MASK),
        C(FLAG_PRIO_SHIFT), C(PRIO_SLOT_BIAS), C(ZC_THRESHOLD), {"TRANSFER_FLAG", RT_TRANSFER_FLAG},
        {"OBJECT_FLAG", RT_OBJECT_FLAG},
        C(CHAN_CSTATS_OFF), C(CSTATS_SENT_OFF), C(CSTATS_BYTES_SENT_OFF), C(CSTATS_CALLS_OFF),
        C(CSTATS_TIMEOUTS_OFF), C(CSTATS_REFUSED_RATE_OFF), C(CSTATS_REFUSED_SIZE_OFF),
        C(CSTATS_REFUSED_PERM_OFF), C(CSTATS_LATENCY_MAX_OFF), C(CSTATS_LATENCY_SUM_OFF),
        C(CSTATS_LATENCY_COUNT_OFF), C(CSTATS_SEC_INDEX_OFF), C(CSTATS_SEC_COUNT_OFF),
        C(CSTATS_PREV_COUNT_OFF), C(CSTATS_HIST_OFF), C(CSTATS_SIZE), C(STATS_HIST_BUCKETS),
        C(STATS_HIST_BASE_NS), C(STATS_SEC_INDEX_OFF), C(STATS_SEC_COUNT_OFF),
        C(STATS_PREV_COUNT_OFF),
        C(CHAN_SSTATS_OFF), C(SSTATS_RECEIVED_OFF), C(SSTATS_BYTES_RECEIVED_OFF),
        C(SSTATS_REPLIES_OFF), C(SSTATS_REPLY_FAILED_OFF), C(SSTATS_DROPS_RATE_OFF),
        C(SSTATS_DROPS_BANDWIDTH_OFF), C(SSTATS_DROPS_SIZE_OFF), C(SSTATS_DROPS_EXPIRED_OFF),
        C(SSTATS_DROPS_RIGHTS_OFF), C(SSTATS_CANCELLED_OFF), C(SSTATS_SEC_INDEX_OFF),
        C(SSTATS_SEC_COUNT_OFF), C(SSTATS_PREV_COUNT_OFF), C(SSTATS_SIZE),
        C(LARGE_MSG_SIZE), C(LM_CAPABILITY_OFF), C(LM_OPCODE_OFF), C(LM_FLAGS_OFF),
        C(LM_TOTAL_SIZE_OFF), C(LM_CHECKSUM_OFF), C(LM_PAD_OFF), C(LM_REGION_BASE_OFF),
        C(LM_REGION_SIZE_OFF), C(LM_REGION_PERMISSIONS_OFF), C(LM_REGION_CACHE_POLICY_OFF),
        C(LM_INLINE_OFF), C(LM_INLINE_SIZE), C(REGION_PERM_READ), C(CHUNK_ALIGN),
        C(WAIT_SPIN), C(WAIT_ADAPTIVE), C(WAIT_BLOCK), C(DEFAULT_SPIN_NS),
        C(SLEEP_CAP_NS), C(SLICE_NS), C(FULL_SCAN_NS), C(BATCH_MAX),
        C(TP_POOL_PUBLISHED_OFF), C(TP_POOL_HEADER), C(TP_R_HEAD_OFF), C(TP_R_WAKE_OFF), C(TP_R_PUB_WAITING_OFF), C(TP_R_REL_TAIL_OFF),
        C(TP_R_DELIVERED_OFF), C(TP_R_SLEEPING_OFF), C(TP_R_PUB_WAKE_OFF), C(TP_R_REL_HEAD_OFF), C(TP_R_TAKEN_OFF), C(TP_R_DROPPED_OFF),
        C(TP_R_ENTRIES_OFF), C(TP_ENTRY_SIZE), C(TP_ST_WRITTEN), C(TP_ST_TAKEN), C(TP_ST_BUSY),
        {"DEFAULT_RESP_RING_OFF", REQ_RING_OFF + RING_SLOTS_OFF + DEFAULT_NSLOTS * SLOT_SIZE},
        {"RESP_TAIL_OFF", REQ_RING_OFF + RING_SLOTS_OFF + DEFAULT_NSLOTS * SLOT_SIZE + RING_TAIL_OFF},
#undef C
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (add_u64(m, consts[i].name, consts[i].v) < 0)
            goto fail;
    if (PyModule_AddIntConstant(m, "PRIO_MIN", PRIO_MIN) < 0) /* the one negative constant */
        goto fail;
    PyObject *magic = PyBytes_FromStringAndSize("CAPBUSC1", 8);
    if (!magic || PyModule_AddObject(m, "CHAN_MAGIC_BYTES", magic) < 0) {
        Py_XDECREF(magic);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
