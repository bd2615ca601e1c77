/*
 * _native/message.c: Message: a call's reply, a tuple subclass with native getters, and
 * MessageType. GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Message: a call's reply, (opcode, flags, d0, d1, d2, d3, payload or None). -------------
 * A tuple subclass defined here rather than in Python: make_message allocates it directly, and a
 * static type's instances die through tuple's own dealloc (a Python subclass goes through
 * subtype_dealloc and a type reference per object). Its fields are native getters too, so reading
 * reply.data or reply.payload runs no Python frame. */

#define MSG_USER_FLAGS (FLAG_USER_MASK & ~(RT_TRANSFER_FLAG | RT_OBJECT_FLAG))

static PyObject *msg_item(PyObject *t, Py_ssize_t i)
{
    if (PyTuple_GET_SIZE(t) <= i) {
        PyErr_SetString(PyExc_IndexError, "tuple index out of range");
        return NULL;
    }
    return PyTuple_GET_ITEM(t, i);
}

static PyObject *Message_get_opcode(PyObject *t, void *c)
{
    return Py_XNewRef(msg_item(t, 0));
}

static PyObject *Message_get_flags(PyObject *t, void *c)
{
    PyObject *f = msg_item(t, 1);
    if (!f)
        return NULL;
    unsigned long v = PyLong_AsUnsignedLong(f);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLong(v & MSG_USER_FLAGS);
}

static PyObject *Message_get_data(PyObject *t, void *c)
{
    if (!msg_item(t, 5))
        return NULL;
    return PyTuple_GetSlice(t, 2, 6);
}

/* The payload: item 6, or b"" when that is None or empty. */
static PyObject *Message_get_payload(PyObject *t, void *c)
{
    PyObject *p = msg_item(t, 6);
    if (!p)
        return NULL;
    int truth = p == Py_None ? 0 : PyObject_IsTrue(p);
    if (truth < 0)
        return NULL;
    return Py_NewRef(truth ? p : empty_bytes);
}

/* object(trusted=False) of a Message or a Request: object_loads(payload, trusted), the codec
 * handed in by _core.register (see request.c). */
static PyObject *payload_object(PyObject *payload, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"trusted", NULL};
    int trusted = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:object", kwlist, &trusted))
        return NULL;
    if (core_registered() < 0)
        return NULL;
    return PyObject_CallFunctionObjArgs(object_loads, payload, trusted ? Py_True : Py_False, NULL);
}

static PyObject *Message_object(PyObject *t, PyObject *args, PyObject *kw)
{
    PyObject *payload = Message_get_payload(t, NULL);
    if (!payload)
        return NULL;
    PyObject *r = payload_object(payload, args, kw);
    Py_DECREF(payload);
    return r;
}

static PyObject *Message_repr(PyObject *t)
{
    PyObject *data = Message_get_data(t, NULL);
    PyObject *payload = data ? Message_get_payload(t, NULL) : NULL;
    Py_ssize_t n = payload ? PyObject_Length(payload) : -1;
    PyObject *r = NULL;
    if (n >= 0)
        r = PyUnicode_FromFormat("<capbus.Message opcode=%R data=%R payload=%zd bytes>",
                                 PyTuple_GET_ITEM(t, 0), data, n);
    Py_XDECREF(data);
    Py_XDECREF(payload);
    return r;
}

static PyMethodDef Message_methods[] = {
    {"object", (PyCFunction)(void (*)(void))Message_object, METH_VARARGS | METH_KEYWORDS,
     "object(trusted=False): the Python object the payload carries (see Endpoint.call_object)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Message_getset[] = {
    {"opcode", (getter)Message_get_opcode, NULL, "the reply's opcode", NULL},
    {"flags", (getter)Message_get_flags, NULL, "user flags", NULL},
    {"data", (getter)Message_get_data, NULL, "the four u64 data words", NULL},
    {"payload", (getter)Message_get_payload, NULL, "the payload (b'' when none)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus.Message",
    .tp_repr = Message_repr,
    .tp_free = Message_free,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A received message: .opcode, .flags, .data (four u64) and .payload (bytes).\n\n"
              "A tuple underneath (opcode, flags, d0, d1, d2, d3, payload or None), exactly as\n"
              "the native core returns it.",
    .tp_methods = Message_methods,
    .tp_getset = Message_getset,
};
