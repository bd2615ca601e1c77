/*
 * _native/request.c: Request: one received message, answered with .reply() / reply_error (HOT: the
 * reply path), its getters, payload object and transfers, and RequestType. Replies only to the
 * channel instance it came from. GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Request: one received message, answered with .reply(). -------------------------------- */

/* The runtime's own user flag bits (capbus._runtime.message takes them from here). */
#define RT_TRANSFER_FLAG 0x80000000u /* capabilities or regions travel with this message */
#define RT_OBJECT_FLAG 0x40000000u   /* the payload is an object (capbus._runtime.objects) */

typedef struct {
    PyObject_HEAD
    ServerSetObject *set; /* strong reference */
    /* .opcode and .payload are built when the request is received and read as object members
     * (T_OBJECT_EX): the interpreter specialises such reads to a load from the object
     * (LOAD_ATTR_SLOT), where a getter or a T_UINT member costs a descriptor call each time. A
     * server reads the opcode of every request, to dispatch. .data stays a getter: building the
     * tuple for every message would cost a receiver that drains a stream in batches (recv_many)
     * a quarter of its throughput. */
    PyObject *opcode_o;   /* the opcode as an int */
    PyObject *data_t;     /* the data 4-tuple, built on first use */
    PyObject *payload;    /* bytes (b"" when none) or a read-only memoryview of the arena
                             (zero-copy: zbuf is set); never NULL while the request lives */
    ZBufObject *zbuf;     /* strong: the zero-copy payload's buffer, or NULL */
    uint64_t plen;        /* payload bytes */
    PyObject *regions;    /* NULL reads as () */
    PyObject *caps;       /* NULL reads as () */
    PyObject *topics;     /* topic capabilities that came with it; NULL reads as () */
    uint64_t tag;
    uint64_t capability;
    uint64_t sender;
    uint64_t serial;      /* of its channel: a reply never reaches a later channel at the index */
    uint64_t generation;  /* its channel's, as given to add(generation=) */
    uint64_t data[4];
    uint32_t index;
    uint32_t opcode;
    uint32_t flags;       /* as received (FLAG_REPLY_EXPECTED etc.) */
    int done;
    int16_t prio;         /* the priority it asks for, clamped (prio_of), or PRIO_NONE */
    int8_t prio_rr;       /* ... SCHED_RR rather than SCHED_FIFO */
    /* A new field: set it in ss_pop, or clear it in request_alloc (free-list reuse). */
} RequestObject;

static PyTypeObject RequestType;

static int Request_traverse(RequestObject *R, visitproc visit, void *arg)
{
    Py_VISIT(R->data_t);
    Py_VISIT(R->regions);
    Py_VISIT(R->caps);
    Py_VISIT(R->topics);
    return 0;
}

static HOT int Request_clear(RequestObject *R)
{
    Py_CLEAR(R->opcode_o);
    Py_CLEAR(R->data_t);
    Py_CLEAR(R->regions);
    Py_CLEAR(R->caps);
    Py_CLEAR(R->topics);
    return 0;
}

/* Done with a zero-copy payload: the Request lets go of its own view (.payload reads as a
 * released memoryview from now on), and the chunk goes back to the client (in FIFO order behind
 * any older held chunk) now if no other view is left, else when the last one goes. No-op
 * otherwise, and the second time. */
static HOT void req_release_payload(RequestObject *R)
{
    ZBufObject *E = R->zbuf;
    if (!E || E->done)
        return;
    E->done = 1;
    PyObject *own = R->payload;
    R->payload = Py_NewRef(released_view);
    Py_DECREF(own); /* when only we held it, its export goes: zb_last_export releases the chunk */
    if (E->exports == 0)
        zb_release_chunk(E); /* the user had released every view already (memoryview.release) */
}

static void req_no_reply(RequestObject *R);

static HOT void Request_dealloc(RequestObject *R)
{
    PyObject_GC_UnTrack(R);
    if (__builtin_expect(!R->done && (R->flags & FLAG_REPLY_EXPECTED), 0))
        req_no_reply(R);
    req_release_payload(R);
    Request_clear(R);
    Py_CLEAR(R->payload);
    Py_CLEAR(R->zbuf);
    Py_CLEAR(R->set);
    if (Py_TYPE(R) == &RequestType && free_list_push(&req_free_list, (PyObject *)R))
        return;
    Py_TYPE(R)->tp_free((PyObject *)R);
}

/* A new instance of req_type, tracked (as tp_alloc makes it). From the free list only the
 * fields ss_pop does not set are cleared (tp_alloc zeroes them all). */
static HOT RequestObject *request_alloc(void)
{
    if (req_type == &RequestType) {
        RequestObject *R = (RequestObject *)free_list_pop(&req_free_list);
        if (R) {
            PyObject_Init((PyObject *)R, &RequestType);
            R->data_t = R->regions = R->caps = R->topics = NULL;
            R->zbuf = NULL;
            R->done = 0;
            PyObject_GC_Track(R);
            return R;
        }
    }
    return (RequestObject *)req_type->tp_alloc(req_type, 0);
}

/* Send a reply for R (GIL held): True if it was written into the client's response ring.
 * A reply that cannot be delivered -- the client is gone, its channel is not open, it does not
 * read its replies (a full response ring) or it scribbled that ring -- is dropped and counted
 * (reply_failed): False, and the request counts as answered. Only bad arguments raise. */
static HOT PyObject *req_send(RequestObject *R, outmsg_t *m, PyObject *payload_o, int empty_is_none)
{
    ServerSetObject *S = R->set;
    if (check_fork(S->fork_gen, "capbus request") < 0)
        return NULL;
    chan_t *ch = S->db ? S->table[R->index] : NULL;
    if (ch && ch->serial != R->serial)
        ch = NULL; /* a later channel at the same index */
    if (!ch || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED) || ctrl_state(ch->ctrl) != STATE_OPEN) {
        R->done = 1;
        if (ch) /* a removed channel has no header to count in any more */
            stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
        req_release_payload(R);
        prio_restore(); /* answered, if to no one: the caller's priority ends here too */
        Py_RETURN_FALSE;
    }
    Py_buffer view;
    if (parse_payload(payload_o, m, &view, max_payload_for(ch->resp.asize), empty_is_none) < 0)
        return NULL;
    const char *why = NULL;
    /* Answered from here on: ss_write_reply may drop the GIL, and a second thread replying to
     * the same request meanwhile must get "already replied", not send a second reply. */
    R->done = 1;
    int r = ss_write_reply(S, ch, m, &why, APP_REPLY_DEFER); /* ch may be gone after this */
    release_view(&view);
    req_release_payload(R); /* answered (or dropped): the payload is the request's no more */
    prio_restore(); /* a thread that adopted its caller's priority goes back to its own */
    return Py_NewRef(r == RG_OK ? Py_True : Py_False);
}

/* An error reply with FLAG_ERROR (| FLAG_IPC_ERROR for capbus's own codes); text: str (UTF-8)
 * or bytes, cut to 4096 bytes (a readable message, not a data channel). True if delivered;
 * False if answered already, one-way, or undeliverable. */
static PyObject *req_send_error(RequestObject *R, uint64_t code, PyObject *text_o, uint32_t flags)
{
    PyObject *text;
    if (PyUnicode_Check(text_o)) {
        text = PyUnicode_AsEncodedString(text_o, "utf-8", "replace");
        if (!text)
            return NULL;
    } else if (PyObject_CheckBuffer(text_o)) {
        text = Py_NewRef(text_o);
    } else {
        PyErr_SetString(PyExc_TypeError, "text must be str or bytes");
        return NULL;
    }
    if (R->done || !(R->flags & FLAG_REPLY_EXPECTED)) {
        Py_DECREF(text);
        Py_RETURN_FALSE;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(text, &v, PyBUF_SIMPLE) < 0) {
        Py_DECREF(text);
        return NULL;
    }
    PyObject *cut = PyBytes_FromStringAndSize(v.buf, v.len > 4096 ? 4096 : v.len);
    PyBuffer_Release(&v);
    Py_DECREF(text);
    if (!cut)
        return NULL;
    outmsg_t m;
    m.capability = 0;
    m.opcode = 0;
    m.flags = FLAG_ERROR | flags;
    m.tag = R->tag;
    m.data[0] = code;
    m.data[1] = m.data[2] = m.data[3] = 0;
    PyObject *r = req_send(R, &m, cut, 1);
    Py_DECREF(cut);
    return r;
}

/* A call dropped without a reply (released, or deallocated): its caller gets NoReply now rather
 * than waiting for ever. Never raises (it runs from a deallocator too). */
static void req_no_reply(RequestObject *R)
{
    if (R->done || !(R->flags & FLAG_REPLY_EXPECTED) || !R->set)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *text = PyUnicode_FromString("the service dropped the request without replying");
    PyObject *r = text ? req_send_error(R, code_no_reply, text, FLAG_IPC_ERROR) : NULL;
    Py_XDECREF(text);
    Py_XDECREF(r);
    R->done = 1;
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* reply(opcode=0, data=(), payload=b"", flags=0) */
static HOT PyObject *Request_reply(RequestObject *R, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    static const char *const kw[] = {"opcode", "data", "payload", "flags", NULL};
    PyObject *a[4];
    if (fast_args("reply", args, nargs, kwnames, kw, 0, a) < 0)
        return NULL;
    if (R->done) {
        PyErr_SetString(IpcError, "this request has already been replied to");
        return NULL;
    }
    if (!(R->flags & FLAG_REPLY_EXPECTED)) {
        PyErr_SetString(IpcError, "this message came from send_async: it takes no reply");
        return NULL;
    }
    outmsg_t m;
    m.capability = 0;
    m.opcode = 0;
    m.flags = 0;
    m.tag = R->tag;
    if (a[0] && to_u32(a[0], &m.opcode, "opcode") < 0)
        return NULL;
    if (a[3]) {
        if (to_u32(a[3], &m.flags, "flags") < 0)
            return NULL;
        if (m.flags & ~(FLAG_USER_MASK | FLAG_CHECKSUM)) {
            PyErr_Format(PyExc_ValueError, "user flags must lie in 0x%x, got 0x%x",
                         FLAG_USER_MASK, m.flags);
            return NULL;
        }
    }
    if (a[1]) {
        if (parse_data(a[1], m.data) < 0)
            return NULL;
    } else {
        memset(m.data, 0, sizeof m.data);
    }
    return req_send(R, &m, a[2] ? a[2] : Py_None, 1);
}

/* reply_error(code, text): the application's error (RemoteError at the caller, .code = code). */
static PyObject *Request_reply_error(RequestObject *R, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames)
{
    static const char *const kw[] = {"code", "text", NULL};
    PyObject *a[2];
    uint64_t code;
    if (fast_args("reply_error", args, nargs, kwnames, kw, 2, a) < 0 ||
        to_u64(a[0], &code, "code") < 0)
        return NULL;
    return req_send_error(R, code, a[1], 0);
}

/* _reply_ipc_error(code, text): a capbus error (the caller raises the IpcError of that code). */
static PyObject *Request_reply_ipc_error(RequestObject *R, PyObject *const *args,
                                         Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const kw[] = {"code", "text", NULL};
    PyObject *a[2];
    uint64_t code;
    if (fast_args("_reply_ipc_error", args, nargs, kwnames, kw, 2, a) < 0 ||
        to_u64(a[0], &code, "code") < 0)
        return NULL;
    return req_send_error(R, code, a[1], FLAG_IPC_ERROR);
}

/* The four data words as a tuple of ints (a new reference). */
static HOT PyObject *data_tuple(const uint64_t d[4])
{
    PyObject *t = PyTuple_New(4);
    if (!t)
        return NULL;
    for (int i = 0; i < 4; i++) {
        PyObject *o = u64_object(d[i]);
        if (!o) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, o);
    }
    return t;
}

static HOT PyObject *Request_get_data(RequestObject *R, void *c)
{
    if (!R->data_t && !(R->data_t = data_tuple(R->data)))
        return NULL;
    return Py_NewRef(R->data_t);
}

static PyObject *Request_get_priority(RequestObject *R, void *c)
{
    if (R->prio == PRIO_NONE)
        Py_RETURN_NONE;
    return PyLong_FromLong(R->prio);
}

static PyObject *Request_get_flags(RequestObject *R, void *c)
{
    return PyLong_FromUnsignedLong(R->flags & FLAG_USER_MASK);
}

static PyObject *empty_bytes, *empty_tuple;

static PyObject *Request_get_expects_reply(RequestObject *R, void *c)
{
    return PyBool_FromLong(R->flags & FLAG_REPLY_EXPECTED);
}

static PyObject *Request_get_replied(RequestObject *R, void *c) { return PyBool_FromLong(R->done); }

/* The caller gave up on this call (its timeout, a cancelled task, its death): its cancel mark
 * (CHAN_CANCEL_BELOW_OFF, written by the client) is past this tag, or the channel is gone. The
 * mark is the client's word, read as a hint: a lying client only cancels its own calls. A
 * gateway polls it to cancel the remote side of a call whose caller stopped waiting. */
static PyObject *Request_get_cancelled(RequestObject *R, void *c)
{
    if (!(R->flags & FLAG_REPLY_EXPECTED))
        Py_RETURN_FALSE;
    ServerSetObject *S = R->set;
    chan_t *ch = S->db ? S->table[R->index] : NULL;
    if (!ch || ch->serial != R->serial || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED) ||
        ctrl_state(ch->ctrl) != STATE_OPEN)
        Py_RETURN_TRUE;
    uint64_t below = __atomic_load_n((uint64_t *)(ch->map + CHAN_CANCEL_BELOW_OFF),
                                     __ATOMIC_RELAXED);
    return PyBool_FromLong(R->tag < below);
}

static PyObject *Request_get_regions(RequestObject *R, void *c)
{
    PyObject *v = R->regions ? R->regions : empty_tuple;
    Py_INCREF(v);
    return v;
}

static int Request_set_regions(RequestObject *R, PyObject *v, void *c)
{
    Py_XINCREF(v); /* NULL (del) resets to () */
    Py_XSETREF(R->regions, v);
    return 0;
}

static PyObject *Request_get_caps(RequestObject *R, void *c)
{
    PyObject *v = R->caps ? R->caps : empty_tuple;
    Py_INCREF(v);
    return v;
}

static int Request_set_caps(RequestObject *R, PyObject *v, void *c)
{
    Py_XINCREF(v);
    Py_XSETREF(R->caps, v);
    return 0;
}

static PyObject *Request_get_topics(RequestObject *R, void *c)
{
    PyObject *v = R->topics ? R->topics : empty_tuple;
    Py_INCREF(v);
    return v;
}

static int Request_set_topics(RequestObject *R, PyObject *v, void *c)
{
    Py_XINCREF(v);
    Py_XSETREF(R->topics, v);
    return 0;
}

static PyObject *Request_repr(RequestObject *R)
{
    PyObject *data = Request_get_data(R, NULL);
    if (!data)
        return NULL;
    PyObject *r = PyUnicode_FromFormat(
        "<capbus.Request from %llu opcode=%u data=%R payload=%llu bytes%s>",
        (unsigned long long)R->sender, R->opcode, data, (unsigned long long)R->plen,
        (R->flags & FLAG_REPLY_EXPECTED) ? (R->done ? " (replied)" : " (call)") : " (one-way)");
    Py_DECREF(data);
    return r;
}

/* release(): done with the request. Its payload goes back (see req_release_payload), and a call
 * not replied to fails its caller with NoReply. */
static PyObject *Request_release(RequestObject *R, PyObject *unused)
{
    req_no_reply(R);
    req_release_payload(R);
    Py_RETURN_NONE;
}

static PyObject *Request_get_zero_copy(RequestObject *R, void *c)
{
    return PyBool_FromLong(R->zbuf != NULL);
}

/* object(trusted=False) and reply_object(obj, opcode=0, pickle=False): object payloads, through
 * the codec the runtime handed in (_core.register: object_loads(payload, trusted) and
 * object_pack(obj, pickle) -> bytes, capbus._runtime.objects); the Request type itself stays
 * native so that receiving and dropping a request costs no Python-level subclass machinery.
 * Strong references, set once. */
static PyObject *object_loads, *object_pack;

static PyObject *Request_object(RequestObject *R, PyObject *args, PyObject *kw)
{
    return payload_object(R->payload, args, kw);
}

static PyObject *Request_reply_object(RequestObject *R, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"obj", "opcode", "pickle", NULL};
    PyObject *obj, *opcode = NULL;
    int pickle = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Op:reply_object", kwlist, &obj, &opcode,
                                     &pickle))
        return NULL;
    if (core_registered() < 0)
        return NULL;
    PyObject *packed = PyObject_CallFunctionObjArgs(object_pack, obj, pickle ? Py_True : Py_False,
                                                    NULL);
    if (!packed)
        return NULL;
    PyObject *op = opcode ? Py_NewRef(opcode) : PyLong_FromLong(0);
    PyObject *flags = PyLong_FromUnsignedLong(RT_OBJECT_FLAG);
    PyObject *r = NULL;
    if (op && flags) {
        PyObject *stack[4] = {op, empty_tuple, packed, flags};
        r = Request_reply(R, stack, 4, NULL);
    }
    Py_XDECREF(op);
    Py_XDECREF(flags);
    Py_DECREF(packed);
    return r;
}

static PyMethodDef Request_methods[] = {
    {"object", (PyCFunction)(void (*)(void))Request_object, METH_VARARGS | METH_KEYWORDS,
     "object(trusted=False): the Python object the payload carries (see Endpoint.send_object /\n"
     "call_object). Its numpy arrays are read-only views of the payload, not copies. The\n"
     "payload is data-only msgpack, which names no code; a pickled one (the sender passed\n"
     "pickle=True) is ProtocolError unless trusted=True, which lets the sender run code here."},
    {"reply_object", (PyCFunction)(void (*)(void))Request_reply_object,
     METH_VARARGS | METH_KEYWORDS,
     "reply_object(obj, opcode=0, pickle=False): answer a call with a Python object (the\n"
     "caller reads it with reply.object()); pickle=True for objects msgpack cannot carry, which\n"
     "only a caller that passes trusted=True will decode."},
    {"release", (PyCFunction)Request_release, METH_NOARGS,
     "release(): done with this request. .payload reads as a released memoryview from now on, "
     "and a zero-copy payload's arena memory goes back to the client once no view taken from it "
     "is left (views you keep stay valid). A call not replied to fails its caller at once with "
     "NoReply (as when the request is garbage-collected unanswered). Replying releases the "
     "payload too. Idempotent."},
    {"reply", (PyCFunction)(void (*)(void))Request_reply, METH_FASTCALL | METH_KEYWORDS,
     "reply(opcode=0, data=(), payload=b'', flags=0) -> bool: answer the call. True if the "
     "reply was delivered; False if it was dropped (and counted) because the client is gone, "
     "does not read its replies, or scribbled its response ring (that channel is then dropped "
     "and reported by the next recv): a client can never make this raise. IpcError if answered "
     "already or a one-way message; ValueError/TypeError/MessageTooLarge for bad arguments."},
    {"reply_error", (PyCFunction)(void (*)(void))Request_reply_error,
     METH_FASTCALL | METH_KEYWORDS,
     "reply_error(code, text) -> bool: answer with the application's own error: the caller "
     "raises capbus.RemoteError with .code = code (any u64, never mistaken for a capbus error) "
     "and .text = text (str or bytes, at most 4096 bytes). False if answered already, a "
     "one-way message, or undeliverable (as reply())."},
    {"_reply_ipc_error", (PyCFunction)(void (*)(void))Request_reply_ipc_error,
     METH_FASTCALL | METH_KEYWORDS,
     "_reply_ipc_error(code, text) -> bool: answer with a capbus error (IpcError.code): the "
     "caller raises that class (Service.serve uses it)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Request_members[] = {
    {"sender", T_ULONGLONG, offsetof(RequestObject, sender), READONLY,
     "kernel-verified ProcessId of the client"},
    {"opcode", T_OBJECT_EX, offsetof(RequestObject, opcode_o), READONLY, "opcode"},
    {"payload", T_OBJECT_EX, offsetof(RequestObject, payload), READONLY,
     "payload: bytes (b'' when none), or for a zero-copy one (FLAG_LOANED or >= ZC_THRESHOLD "
     "bytes) a read-only memoryview of the arena; views taken from it stay valid for as long "
     "as they live, .payload itself until reply/release"},
    {"capability", T_ULONGLONG, offsetof(RequestObject, capability), READONLY,
     "the capability value the client sent (untrusted)"},
    {"index", T_UINT, offsetof(RequestObject, index), READONLY, "channel index (internal)"},
    {"tag", T_ULONGLONG, offsetof(RequestObject, tag), READONLY, "transaction tag (internal)"},
    {"generation", T_ULONGLONG, offsetof(RequestObject, generation), READONLY,
     "the channel instance's generation, as given to ServerSet.add (internal)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Request_getset[] = {
    {"flags", (getter)Request_get_flags, NULL, "user flags (FLAG_USER_MASK bits)", NULL},
    {"priority", (getter)Request_get_priority, NULL,
     "the caller's priority (-nice, or 20 + real-time priority), clamped to what its capability "
     "and the service allow; None if the caller did not send one", NULL},
    {"data", (getter)Request_get_data, NULL, "the four u64 data words", NULL},
    {"zero_copy", (getter)Request_get_zero_copy, NULL,
     "True if .payload is a view of the arena (zero-copy)", NULL},
    {"expects_reply", (getter)Request_get_expects_reply, NULL, "a call (not a send)", NULL},
    {"replied", (getter)Request_get_replied, NULL, "answered already (or its client is gone)",
     NULL},
    {"cancelled", (getter)Request_get_cancelled, NULL,
     "the caller stopped waiting for this call (timeout, cancel, death, or its channel closed)",
     NULL},
    {"regions", (getter)Request_get_regions, (setter)Request_set_regions,
     "shared regions (set by the runtime)", NULL},
    {"caps", (getter)Request_get_caps, (setter)Request_set_caps,
     "capabilities (set by the runtime)", NULL},
    {"topics", (getter)Request_get_topics, (setter)Request_set_topics,
     "topic capabilities (set by the runtime)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_dealloc = (destructor)Request_dealloc,
    .tp_repr = (reprfunc)Request_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A message a Service received (made by recv/poll/recv_many, not by Python code).\n\n"
              ".sender (the kernel-verified ProcessId of the caller), .opcode, .flags, .data,\n"
              ".payload, .expects_reply, .regions, .caps; .reply(opcode=0, data=(), payload=b'',\n"
              "flags=0) answers a call (PeerDied if the caller has gone: the reply is dropped).",
    .tp_traverse = (traverseproc)Request_traverse,
    .tp_clear = (inquiry)Request_clear,
    .tp_methods = Request_methods,
    .tp_members = Request_members,
    .tp_getset = Request_getset,
};
