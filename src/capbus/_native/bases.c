/*
 * _native/bases.c: EndpointBase / ServiceBase: the native halves of capbus.Endpoint (call,
 * send_async) and capbus.Service (recv). What they need of Python (a thread's lane, the slow
 * paths, error replies, claiming attachments) is handed to their __init__ as functions.
 * HOT; GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* =============================================================================================
 * Fronts: the native halves of capbus.Endpoint and capbus.Service.
 *
 * Endpoint.call, Endpoint.send_async and Service.recv are the calls every message goes through.
 * Here they run without a Python frame of their own: on one CPU a blocking round trip costs the
 * sum of both sides' work, and a frame on each side was ~10% of it (and ~40% of an unbatched
 * send_async). Only the plain case runs here; anything else (flags, delegated capabilities or
 * regions, a closed service, a corrupt channel) goes to the slow function the Python subclass
 * handed in (slow_call, slow_send, slow_recv), which is the reference behaviour. A thread's lane
 * comes from open_lane(self) and is cached for that thread (its PyThreadState id, never reused
 * in this interpreter) and this process (fork_gen: a forked child asks again, and is refused).
 *
 * Calls go down only: this file names no Python method or module. Each up-call is a function the
 * subclass passes to EndpointBase.__init__ / ServiceBase.__init__ (so a rename fails at
 * construction, and grep finds every caller), called with the object first: plain functions,
 * not bound methods, because a bound method kept here would make every endpoint a reference
 * cycle, and a received capability goes back to the kernel when its last reference goes.
 * ============================================================================================= */

static PyObject *int_zero;

/* Store a callable handed to __init__ in *slot, or TypeError naming the keyword. */
static int front_set(PyObject **slot, PyObject *o, const char *what)
{
    if (!o || !PyCallable_Check(o)) {
        PyErr_Format(PyExc_TypeError,
                     "%s= must be a function taking the object first, got %.100s", what,
                     o ? Py_TYPE(o)->tp_name : "nothing");
        return -1;
    }
    Py_XSETREF(*slot, Py_NewRef(o));
    return 0;
}

/* An up-call that __init__ never set: a subclass that did not call the base's __init__. Cold and
 * out of line: on the call path it costs one test of a pointer. */
static __attribute__((cold, noinline)) PyObject *front_unset(PyObject *self, const char *what)
{
    PyErr_Format(PyExc_TypeError,
                 "%.100s: %s is not set (the subclass's __init__ must call "
                 "super().__init__(...) with it)",
                 Py_TYPE(self)->tp_name, what);
    return NULL;
}

/* fn(self, *args, **kw) with the arguments of a METH_FASTCALL|METH_KEYWORDS call (fn NULL: the
 * base's __init__ was never called). */
static PyObject *front_slow(PyObject *self, PyObject *fn, PyObject *const *args,
                            Py_ssize_t nargs, PyObject *kwnames)
{
    if (!fn)
        return front_unset(self, "the slow path");
    PyObject *stack[1 + 16];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 16) {
        PyErr_SetString(PyExc_TypeError, "too many arguments");
        return NULL;
    }
    stack[0] = self;
    memcpy(stack + 1, args, (size_t)(nargs + nkw) * sizeof(PyObject *));
    return PyObject_Vectorcall(fn, stack, 1 + nargs, kwnames);
}

/* The payload argument of Endpoint.call/send_async: NULL for none (None, or any empty
 * bytes-like object). Judged by its length in bytes, never by truthiness: a numpy array is its
 * bytes (np.zeros(1) is 8 bytes, not "false"). Anything else goes on to parse_payload, which
 * says what it needs. */
static HOT int front_payload(PyObject *o, PyObject **out)
{
    *out = NULL;
    if (!o || o == Py_None)
        return 0;
    if (PyBytes_CheckExact(o)) {
        if (PyBytes_GET_SIZE(o))
            *out = o;
        return 0;
    }
    if (PyMemoryView_Check(o)) {
        if (PyMemoryView_GET_BUFFER(o)->len)
            *out = o;
        return 0;
    }
    if (PyObject_CheckBuffer(o)) {
        Py_buffer v;
        if (PyObject_GetBuffer(o, &v, PyBUF_SIMPLE) < 0)
            return payload_type_error(o);
        Py_ssize_t n = v.len;
        PyBuffer_Release(&v);
        if (!n)
            return 0;
    }
    *out = o;
    return 0;
}

/* Anything the native path does not handle: nonzero flags, or capabilities/regions to pass. */
static HOT int front_plain(PyObject *flags, PyObject *caps, PyObject *regions)
{
    if (flags && flags != int_zero) { /* 0 is a cached small int: usually the same object */
        if (!PyLong_Check(flags))
            return 0;
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(flags, &overflow);
        if (v == -1 && PyErr_Occurred())
            PyErr_Clear(); /* the Python path raises it again */
        if (v != 0 || overflow)
            return 0;
    }
    for (int i = 0; i < 2; i++) {
        PyObject *o = i ? regions : caps;
        if (!o)
            continue;
        if ((PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 0) ||
            (PyList_CheckExact(o) && PyList_GET_SIZE(o) == 0))
            continue;
        return 0; /* the Python path decides (an empty generator is not "no caps" there either) */
    }
    return 1;
}

typedef struct {
    PyObject_HEAD
    PyObject *handle;       /* the capability's handle (an int), or NULL before it is set */
    uint64_t handle_u64;    /* the same, converted once */
    LaneObject *lane;       /* the lane of the thread that called last (strong), or NULL */
    uint64_t lane_tid;      /* that thread's PyThreadState id */
    unsigned long lane_fork_gen;
    uint64_t lane_epoch;    /* bumped when the handle changes or lanes are forgotten */
    /* The up-calls (strong; NULL until __init__), each called with the endpoint first:
     * open_lane(self) -> Lane, slow_call(self, ...) / slow_send(self, ...) with call's and
     * send_async's arguments, remote_error(self, reply) -> the exception an error reply means. */
    PyObject *open_lane, *slow_call, *slow_send, *remote_error;
} EndpointBaseObject;

/* This thread's lane (a new reference), or NULL with an exception. */
static HOT LaneObject *ep_lane(EndpointBaseObject *E)
{
    uint64_t tid = PyThreadState_GetID(PyThreadState_Get());
    if (E->lane && E->lane_tid == tid && E->lane_fork_gen == fork_gen)
        return (LaneObject *)Py_NewRef(E->lane);
    uint64_t epoch = E->lane_epoch;
    if (!E->open_lane)
        return (LaneObject *)front_unset((PyObject *)E, "open_lane");
    PyObject *core = PyObject_CallOneArg(E->open_lane, (PyObject *)E);
    if (!core)
        return NULL;
    if (!PyObject_TypeCheck(core, &LaneType)) {
        PyErr_Format(PyExc_TypeError, "open_lane() returned %.100s, not a Lane",
                     Py_TYPE(core)->tp_name);
        Py_DECREF(core);
        return NULL;
    }
    /* A reconnect changed the handle while open_lane ran (it can give up the GIL): the lane it
     * chose may be of the old kernel. Use it for this call, but do not keep it. */
    if (E->lane_epoch != epoch)
        return (LaneObject *)core;
    Py_XSETREF(E->lane, (LaneObject *)Py_NewRef(core));
    E->lane_tid = tid;
    E->lane_fork_gen = fork_gen;
    return (LaneObject *)core;
}

static HOT int ep_handle(EndpointBaseObject *E)
{
    if (!E->handle) {
        PyErr_SetString(PyExc_AttributeError, "the endpoint has no handle yet");
        return -1;
    }
    return 0;
}

static const char *const ep_call_kw[] = {"opcode", "data", "payload", "timeout", "flags", "caps",
                                         "regions", "move", NULL};
static const char *const ep_send_kw[] = {"opcode", "data", "payload", "flags", "caps", "regions",
                                         "move", "timeout", NULL};

/* The plain case of call/send_async up to a prepared message: this thread's lane (a new
 * reference), or NULL with an exception. payload_arg as given (`payload or None` is applied). */
static HOT LaneObject *ep_prepare(EndpointBaseObject *E, PyObject *opcode, PyObject *data,
                              PyObject *payload_arg, uint32_t extra, outmsg_t *m, Py_buffer *view,
                              charge_t *c)
{
    PyObject *payload;
    if (ep_handle(E) < 0 || front_payload(payload_arg, &payload) < 0)
        return NULL;
    LaneObject *L = ep_lane(E);
    if (!L)
        return NULL;
    PyObject *la[5] = {NULL, opcode, int_zero, data ? data : empty_tuple, payload};
    m->capability = E->handle_u64;
    if (lane_prepare(L, la, extra, m, view, c) < 0) {
        Py_DECREF(L);
        return NULL;
    }
    return L;
}

/* An error reply: raise what remote_error(self, reply) says it stands for. Steals r. Cold: only
 * an error reply comes here. */
static __attribute__((cold, noinline)) void ep_raise_remote(EndpointBaseObject *E, PyObject *r)
{
    PyObject *exc = E->remote_error
                        ? PyObject_CallFunctionObjArgs(E->remote_error, (PyObject *)E, r, NULL)
                        : front_unset((PyObject *)E, "remote_error");
    Py_DECREF(r);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* call(opcode, data=(), payload=b"", timeout=None, flags=0, caps=(), regions=(), move=False) */
static HOT PyObject *EP_call(EndpointBaseObject *E, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    PyObject *a[8];
    if (fast_args("call", args, nargs, kwnames, ep_call_kw, 1, a) < 0)
        return NULL;
    if (!front_plain(a[4], a[5], a[6]))
        return front_slow((PyObject *)E, E->slow_call, args, nargs, kwnames);
    int64_t tns;
    if (front_timeout(a[3], &tns) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    LaneObject *L = ep_prepare(E, a[0], a[1], a[2], FLAG_REPLY_EXPECTED, &m, &view, &c);
    if (!L)
        return NULL;
    PyObject *r = lane_call_run(L, &m, &view, &c, tns, 0);
    Py_DECREF(L);
    if (r && (PyLong_AsUnsignedLong(PyTuple_GET_ITEM(r, 1)) & FLAG_ERROR)) {
        ep_raise_remote(E, r);
        return NULL;
    }
    return r;
}

/* send_async(opcode, data=(), payload=b"", flags=0, caps=(), regions=(), move=False,
 * timeout=0). A timeout other than 0 means "wait for room": the message is tried here first,
 * and only a full ring or arena goes to the Python path, which waits (room.until_room). */
static PyObject *EP_send_async(EndpointBaseObject *E, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[8];
    if (fast_args("send_async", args, nargs, kwnames, ep_send_kw, 1, a) < 0)
        return NULL;
    if (!front_plain(a[3], a[4], a[5]))
        return front_slow((PyObject *)E, E->slow_send, args, nargs, kwnames);
    int wait = 0;
    if (a[7] && a[7] != int_zero) { /* 0 is a cached small int: usually the same object */
        int64_t tns;
        if (front_timeout(a[7], &tns) < 0)
            return NULL;
        wait = tns != 0;
    }
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    LaneObject *L = ep_prepare(E, a[0], a[1], a[2], 0, &m, &view, &c);
    if (!L)
        return NULL;
    PyObject *r = lane_send_prepared(L, &m, &view, &c);
    Py_DECREF(L);
    if (!r && wait && PyErr_ExceptionMatches(WouldBlock)) {
        PyErr_Clear();
        return front_slow((PyObject *)E, E->slow_send, args, nargs, kwnames);
    }
    return r;
}

/* Drop the cached lane (the endpoint was closed or revoked). */
static PyObject *EP_forget_lanes(EndpointBaseObject *E, PyObject *unused)
{
    E->lane_epoch++;
    Py_CLEAR(E->lane);
    Py_RETURN_NONE;
}

static PyObject *EP_get_handle(EndpointBaseObject *E, void *c)
{
    if (ep_handle(E) < 0)
        return NULL;
    return Py_NewRef(E->handle);
}

static int EP_set_handle(EndpointBaseObject *E, PyObject *v, void *c)
{
    uint64_t h;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete handle");
        return -1;
    }
    if (!PyLong_Check(v) || to_u64(v, &h, "handle") < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "handle must be an int");
        return -1;
    }
    Py_XSETREF(E->handle, Py_NewRef(v));
    E->handle_u64 = h;
    E->lane_epoch++;
    Py_CLEAR(E->lane); /* a lane belongs to one capability */
    return 0;
}

/* Instances are of the Python subclasses, whose traverse visits the type itself (this base is a
 * static type): ours visits only our own references. */
static int EP_traverse(EndpointBaseObject *E, visitproc visit, void *arg)
{
    Py_VISIT(E->lane);
    Py_VISIT(E->open_lane);
    Py_VISIT(E->slow_call);
    Py_VISIT(E->slow_send);
    Py_VISIT(E->remote_error);
    return 0;
}

static int EP_clear(EndpointBaseObject *E)
{
    Py_CLEAR(E->lane);
    Py_CLEAR(E->handle);
    Py_CLEAR(E->open_lane);
    Py_CLEAR(E->slow_call);
    Py_CLEAR(E->slow_send);
    Py_CLEAR(E->remote_error);
    return 0;
}

/* __init__(self, *, open_lane, slow_call, slow_send, remote_error): the up-calls (see the head
 * of this file), all required. */
static int EP_init(EndpointBaseObject *E, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"open_lane", "slow_call", "slow_send", "remote_error", NULL};
    PyObject *f[4] = {NULL, NULL, NULL, NULL};
    if (core_registered() < 0)
        return -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOOO:EndpointBase", kwlist, &f[0], &f[1],
                                     &f[2], &f[3]))
        return -1;
    if (front_set(&E->open_lane, f[0], kwlist[0]) < 0 ||
        front_set(&E->slow_call, f[1], kwlist[1]) < 0 ||
        front_set(&E->slow_send, f[2], kwlist[2]) < 0 ||
        front_set(&E->remote_error, f[3], kwlist[3]) < 0)
        return -1;
    return 0;
}

static void EP_dealloc(EndpointBaseObject *E)
{
    PyTypeObject *tp = Py_TYPE(E);
    PyObject_GC_UnTrack(E);
    EP_clear(E);
    tp->tp_free((PyObject *)E);
}

static PyMethodDef EP_methods[] = {
    {"call", (PyCFunction)(void (*)(void))EP_call, METH_FASTCALL | METH_KEYWORDS,
     "call($self, /, opcode, data=(), payload=b'', timeout=None, flags=0, caps=(), regions=(),"
     " move=False)\n--\n\n"
     "Send a request and wait for the reply (a Message).\n\n"
     "Timeout cancels the transaction (a late reply is dropped); PeerDied if the server exits;\n"
     "ValueError / MessageTooLarge / RateLimitExceeded before anything is sent if the arguments\n"
     "or the capability's limits do not allow it. caps: capabilities to delegate with it (each\n"
     "needs the share right); they arrive as req.caps. regions: shared memory regions to pass\n"
     "on, arriving as req.regions; move=True transfers them (this side loses them), else they\n"
     "are shared (needs the share right)."},
    {"send_async", (PyCFunction)(void (*)(void))EP_send_async, METH_FASTCALL | METH_KEYWORDS,
     "send_async($self, /, opcode, data=(), payload=b'', flags=0, caps=(), regions=(), "
     "move=False, timeout=0)\n--\n\n"
     "Queue a one-way message. timeout=0 (the default) never blocks: WouldBlock when the\n"
     "receiver's ring for this sender is full (back-pressure: nothing is dropped silently);\n"
     "a timeout in seconds (None: no limit) waits that long for room, then WouldBlock."},
    {"_forget_lanes", (PyCFunction)EP_forget_lanes, METH_NOARGS, "drop the cached lane"},
    {NULL},
};

static PyGetSetDef EP_getset[] = {
    {"handle", (getter)EP_get_handle, (setter)EP_set_handle, "the capability's handle", NULL},
    {NULL},
};

static PyTypeObject EndpointBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.EndpointBase",
    .tp_basicsize = sizeof(EndpointBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native half of capbus.Endpoint (call and send_async).",
    .tp_traverse = (traverseproc)EP_traverse,
    .tp_clear = (inquiry)EP_clear,
    .tp_dealloc = (destructor)EP_dealloc,
    .tp_methods = EP_methods,
    .tp_getset = EP_getset,
    .tp_init = (initproc)EP_init,
    .tp_new = PyType_GenericNew,
};

typedef struct {
    PyObject_HEAD
    ServerSetObject *set; /* _set (strong), or NULL */
    char closed;          /* _closed */
    char slow;            /* _slow: more than one ServerSet to serve (recv goes to slow_recv) */
    PyObject *lost;       /* _lost: why it closed when its kernel is gone for good, or NULL */
    /* The up-calls (strong; NULL until __init__), each called with the service first:
     * slow_recv(self, timeout=None, corrupt=None) -> Request, with recv's arguments (and a
     * CorruptChannel to report first); claim(self, request): take its attachments. */
    PyObject *slow_recv, *claim;
} ServiceBaseObject;

static const char *const sv_recv_kw[] = {"timeout", NULL};

/* recv(timeout=None) -> Request */
/* Closed because its kernel is gone for good (the Python side set _lost): recv() then raises
 * that (KernelUnavailable) rather than the Cancelled a close() gives. Cold: after an interrupt. */
static int sv_lost(ServiceBaseObject *V)
{
    return V->closed && V->lost && V->lost != Py_None;
}

static HOT PyObject *SV_recv(ServiceBaseObject *V, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    PyObject *a[1];
    if (fast_args("recv", args, nargs, kwnames, sv_recv_kw, 0, a) < 0)
        return NULL;
    if (V->closed || !V->set || V->slow)
        return front_slow((PyObject *)V, V->slow_recv, args, nargs, kwnames);
    int64_t tns;
    if (front_timeout(a[0], &tns) < 0)
        return NULL;
    /* The coarse clock (no CLOCK_MONOTONIC read on the hot path: see "Lazy deadlines"); only a
     * reconnect below needs the time left, and a tick more or less does not matter there. */
    uint64_t deadline = tns < 0 ? UINT64_MAX : coarse_ns() + (uint64_t)tns;
    if (deadline < (uint64_t)tns) /* wrapped: beyond ~292 years */
        deadline = UINT64_MAX;
    ServerSetObject *S = (ServerSetObject *)Py_NewRef(V->set);
    PyObject *req = ss_recv(S, tns);
    /* Interrupted because the service closed (or lost its kernel for good: the Python side says
     * which), or because a reconnect gave it a new ServerSet: go on there, within the time left
     * (in Python while the old kernel's channels are still served beside the new ones). */
    while (!req && PyErr_ExceptionMatches(Cancelled) && (sv_lost(V) || V->set != S || V->slow)) {
        PyErr_Clear();
        Py_DECREF(S);
        if (V->closed || !V->set || V->slow)
            return front_slow((PyObject *)V, V->slow_recv, args, nargs, kwnames);
        S = (ServerSetObject *)Py_NewRef(V->set);
        uint64_t now = coarse_ns();
        req = ss_recv(S, deadline == UINT64_MAX ? -1 : now >= deadline ? 0 : (int64_t)(deadline - now));
    }
    Py_DECREF(S);
    if (req) {
        if (((RequestObject *)req)->flags & RT_TRANSFER_FLAG) {
            PyObject *r = V->claim
                              ? PyObject_CallFunctionObjArgs(V->claim, (PyObject *)V, req, NULL)
                              : front_unset((PyObject *)V, "claim");
            if (!r)
                Py_CLEAR(req);
            Py_XDECREF(r);
        }
        return req;
    }
    if (!PyErr_ExceptionMatches(CorruptChannel))
        return NULL;
    /* Garbage on a channel: the Python loop reports it and goes on, within what is left of the
     * caller's timeout (garbage does not extend it). */
    PyObject *etype, *exc, *tb;
    PyErr_Fetch(&etype, &exc, &tb);
    PyErr_NormalizeException(&etype, &exc, &tb);
    Py_XDECREF(etype);
    Py_XDECREF(tb);
    if (!exc)
        return NULL;
    PyObject *left = Py_NewRef(Py_None);
    if (deadline != UINT64_MAX) {
        uint64_t now = coarse_ns();
        Py_SETREF(left, PyFloat_FromDouble(now >= deadline ? 0.0 : (deadline - now) / 1e9));
    }
    PyObject *out = NULL;
    if (left)
        out = V->slow_recv
                  ? PyObject_CallFunctionObjArgs(V->slow_recv, (PyObject *)V, left, exc, NULL)
                  : front_unset((PyObject *)V, "slow_recv");
    Py_XDECREF(left);
    Py_DECREF(exc);
    return out;
}

static PyObject *SV_get_set(ServiceBaseObject *V, void *c)
{
    if (!V->set) {
        PyErr_SetString(PyExc_AttributeError, "_set");
        return NULL;
    }
    return Py_NewRef(V->set);
}

static int SV_set_set(ServiceBaseObject *V, PyObject *v, void *c)
{
    if (v && !PyObject_TypeCheck(v, &ServerSetType)) {
        PyErr_SetString(PyExc_TypeError, "_set must be a ServerSet");
        return -1;
    }
    Py_XSETREF(V->set, (ServerSetObject *)Py_XNewRef(v));
    return 0;
}

static int SV_traverse(ServiceBaseObject *V, visitproc visit, void *arg)
{
    Py_VISIT(V->set);
    Py_VISIT(V->lost);
    Py_VISIT(V->slow_recv);
    Py_VISIT(V->claim);
    return 0;
}

static int SV_clear(ServiceBaseObject *V)
{
    Py_CLEAR(V->set);
    Py_CLEAR(V->lost);
    Py_CLEAR(V->slow_recv);
    Py_CLEAR(V->claim);
    return 0;
}

/* __init__(self, *, slow_recv, claim): the up-calls (see the head of this file), required. */
static int SV_init(ServiceBaseObject *V, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"slow_recv", "claim", NULL};
    PyObject *f[2] = {NULL, NULL};
    if (core_registered() < 0)
        return -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OO:ServiceBase", kwlist, &f[0], &f[1]))
        return -1;
    if (front_set(&V->slow_recv, f[0], kwlist[0]) < 0 || front_set(&V->claim, f[1], kwlist[1]) < 0)
        return -1;
    return 0;
}

static void SV_dealloc(ServiceBaseObject *V)
{
    PyTypeObject *tp = Py_TYPE(V);
    PyObject_GC_UnTrack(V);
    SV_clear(V);
    tp->tp_free((PyObject *)V);
}

static PyMethodDef SV_methods[] = {
    {"recv", (PyCFunction)(void (*)(void))SV_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv($self, /, timeout=None)\n--\n\n"
     "The next message from any client (round robin across them); Timeout if none."},
    {NULL},
};

static PyMemberDef SV_members[] = {
    {"_closed", T_BOOL, offsetof(ServiceBaseObject, closed), 0, "unregistered"},
    {"_slow", T_BOOL, offsetof(ServiceBaseObject, slow), 0,
     "recv() goes to slow_recv (channels of a former kernel are served too)"},
    {"_lost", T_OBJECT, offsetof(ServiceBaseObject, lost), 0,
     "why it closed when its kernel is gone for good (KernelUnavailable), or None"},
    {NULL},
};

static PyGetSetDef SV_getset[] = {
    {"_set", (getter)SV_get_set, (setter)SV_set_set, "the ServerSet", NULL},
    {NULL},
};

static PyTypeObject ServiceBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.ServiceBase",
    .tp_basicsize = sizeof(ServiceBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native half of capbus.Service (recv).",
    .tp_traverse = (traverseproc)SV_traverse,
    .tp_clear = (inquiry)SV_clear,
    .tp_dealloc = (destructor)SV_dealloc,
    .tp_methods = SV_methods,
    .tp_members = SV_members,
    .tp_getset = SV_getset,
    .tp_init = (initproc)SV_init,
    .tp_new = PyType_GenericNew,
};
