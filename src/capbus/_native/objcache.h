/*
 * _native/objcache.h: Result objects: cached small ints, free lists of Message and Request, and
 * the Message allocation that call() results are made with. GIL held; HOT.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_OBJCACHE_H
#define CAPBUS_NATIVE_OBJCACHE_H

/* ---- Result objects. ------------------------------------------------------------------------ */

/* The classes call() results and received requests are made of: _core.Message and _core.Request,
 * set at module init (variables rather than the types themselves, so that the allocation paths
 * stay as they were tuned: NULL msg_type would mean plain tuples). Strong references. */
static PyTypeObject *msg_type;
static PyTypeObject *req_type;

/* The interpreter's own cached ints 0..255, looked up once: an opcode, a flags word or a data
 * value in that range becomes an int without a call into the interpreter (whose code for it
 * would be one more page touched per message). */
#define SMALL_INTS 256
static PyObject *small_ints[SMALL_INTS];

static int small_ints_init(void)
{
    for (int i = 0; i < SMALL_INTS; i++)
        if (!small_ints[i] && !(small_ints[i] = PyLong_FromLong(i)))
            return -1;
    return 0;
}

static inline PyObject *u64_object(uint64_t v)
{
    return v < SMALL_INTS ? Py_NewRef(small_ints[v]) : PyLong_FromUnsignedLongLong(v);
}

/* Free lists of the two result types (exact types only; GIL held). A round trip makes one
 * Message and one Request and frees them soon after: reusing the memory skips the allocator,
 * the zeroing and the collector's bookkeeping, work that runs on cold caches right after a
 * context switch. The list keeps the memory of objects whose deallocation ran in full (their
 * references are gone and the collector no longer tracks them); taking one out starts its life
 * again as a fresh allocation would (PyObject_Init, empty fields, then tracked). */
#define FREE_LIST_MAX 16
typedef struct {
    int n;
    PyObject *items[FREE_LIST_MAX];
} free_list_t;
static free_list_t msg_free_list, req_free_list;

static inline int free_list_push(free_list_t *fl, PyObject *o)
{
    if (fl->n == FREE_LIST_MAX)
        return 0;
    fl->items[fl->n++] = o;
    return 1;
}

static inline PyObject *free_list_pop(free_list_t *fl)
{
    return fl->n ? fl->items[--fl->n] : NULL;
}

static PyTypeObject MessageType;

#define MESSAGE_ITEMS 7

/* MessageType's tp_free: tuple's deallocator has untracked it and released its items. */
static HOT void Message_free(void *p)
{
    PyObject *o = p;
    if (Py_TYPE(o) == &MessageType && Py_SIZE(o) == MESSAGE_ITEMS &&
        free_list_push(&msg_free_list, o))
        return;
    PyObject_GC_Del(p);
}

/* A new instance of msg_type (or a tuple), tracked, with 7 NULL items. */
static HOT PyObject *message_alloc(void)
{
    if (msg_type == &MessageType) {
        PyObject *t = free_list_pop(&msg_free_list);
        if (t) {
            memset(((PyTupleObject *)t)->ob_item, 0, MESSAGE_ITEMS * sizeof(PyObject *));
            PyObject_InitVar((PyVarObject *)t, &MessageType, MESSAGE_ITEMS);
            PyObject_GC_Track(t);
            return t;
        }
    }
    return msg_type ? msg_type->tp_alloc(msg_type, MESSAGE_ITEMS) : PyTuple_New(MESSAGE_ITEMS);
}

/* (opcode, flags, d0, d1, d2, d3, payload or None) as a msg_type instance, allocated directly
 * (no Python-level constructor runs). Steals `payload`. */
static HOT PyObject *make_message(const slot_t *s, PyObject *payload)
{
    PyObject *t = message_alloc();
    if (!t) {
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 6, payload);
    PyObject *o = u64_object(s->opcode);
    if (!o)
        goto fail;
    PyTuple_SET_ITEM(t, 0, o);
    if (!(o = u64_object(s->flags)))
        goto fail;
    PyTuple_SET_ITEM(t, 1, o);
    for (int i = 0; i < 4; i++) {
        if (!(o = u64_object(s->data[i])))
            goto fail;
        PyTuple_SET_ITEM(t, 2 + i, o);
    }
    return t;
fail:
    Py_DECREF(t); /* the remaining NULL items are fine for the tuple's dealloc */
    return NULL;
}

#endif /* CAPBUS_NATIVE_OBJCACHE_H */
