/*
 * capbus._layout -- what the trusted kernel uses of the native core: _native/layout_module.c, its
 * one translation unit.
 *
 * The kernel creates the shared memory (capbus._kernel.shm) and never moves a message: it needs
 * the layout constants to lay a channel out and write its control page, channel_size and
 * resp_ring_off, two atomic stores, futex_wake (to wake a client after a state change),
 * channel_stats (introspection reads the counters both ends keep) and set_dumpable
 * (capbus._protect). That is all this module holds. The rings, arenas, Lane, ServerSet, Request,
 * Message and the waits stay in capbus._core, which no module of the kernel imports: the code
 * that parses what peers write into a channel is not in the kernel's import closure (the capbus
 * package's __init__ still imports the runtime, and so _core, for the public names).
 *
 * Nothing is copied from capbus._core: this file #includes the same parts of _native/ that
 * module.c does (each function, constant and method-table entry has one definition), and only
 * those that need no ring: layout.h (every offset), limits.h (its clock), clock.h, futex.h (the
 * syscalls), primitives.c (atomics and futex calls on a buffer), helpers.c (channel geometry),
 * metrics.c (the channel_stats reader), dumpable.c. Its API: src/capbus/_layout.pyi. Needs no
 * register() call: it raises only Python's own exceptions (ValueError, TypeError, OSError).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The shared parts define a little more than the kernel uses (futex_wait, the loads and CAS,
 * max_payload, latency_clock, the TSC calibration): unused static functions, which the compiler
 * leaves out of this module. Only the warning about them is silenced, for these includes. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "layout.h"
#include "limits.h"
#include "clock.h"
#include "futex.h"
#include "primitives.c"
#include "helpers.c"
#include "metrics.c"
#include "dumpable.c"
#pragma GCC diagnostic pop

static PyMethodDef layout_methods[] = {
    METHOD_CHANNEL_SIZE,
    METHOD_RESP_RING_OFF,
    METHOD_ATOMIC_STORE_U32,
    METHOD_ATOMIC_STORE_U64,
    METHOD_FUTEX_WAKE,
    METHOD_CHANNEL_STATS,
    METHOD_SET_DUMPABLE,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef layout_module = {
    PyModuleDef_HEAD_INIT, "capbus._layout",
    "What the capbus kernel uses of the native core: the shared-memory layout, channel geometry, "
    "atomic stores, futex_wake, channel_stats, set_dumpable (its API: src/capbus/_layout.pyi).",
    -1, layout_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__layout(void)
{
    PyObject *m = PyModule_Create(&layout_module);
    if (!m)
        return NULL;
    /* The constants the kernel reads (capbus._kernel.shm), with their values from layout.h. */
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
        C(CTRL_CHAIN_MAX),
        C(RIGHT_SEND), C(RIGHT_RECEIVE), C(RIGHT_SHARE), C(RIGHT_MAP), C(RIGHT_READ),
        C(RIGHT_WRITE),
        C(STATE_OPEN), C(STATE_REVOKED), C(STATE_PEER_DEAD), C(STATE_CLOSED),
        C(DOORBELL_SIZE), C(MAX_CHANNELS),
        C(CHAN_MAGIC_OFF), C(CHAN_VERSION_OFF), C(CHAN_NSLOTS_OFF), C(CHAN_ARENA_SIZE_OFF),
        C(CHAN_MAGIC), C(CHAN_VERSION), C(RING_TAIL_OFF),
#undef C
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
        PyObject *o = PyLong_FromUnsignedLongLong(consts[i].v);
        if (!o || PyModule_AddObject(m, consts[i].name, o) < 0) {
            Py_XDECREF(o);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "PRIO_MIN", PRIO_MIN) < 0) { /* the one negative constant */
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
