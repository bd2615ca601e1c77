/*
 * _native/zbuf.c: ZBuf: views of shared memory (zero-copy payloads and loans) that keep their
 * memory for as long as any view lives. Its lifetime (release to its owner) is in zbuf_release.c.
 * GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Views of shared memory (zero-copy payloads and loans). -----------------------------------
 * Request.payload (zero-copy) and Lane.loan() hand out memoryviews of a ZBuf, a tiny exporter
 * over arena memory that allows any number of exports and counts them. Every view made from the
 * memoryview (slices, casts, memoryview(mv), pickle's out-of-band buffers) shares its managed
 * buffer, which holds one export until the last of those views is gone; a consumer that keeps
 * the memoryview object instead of an export (numpy.frombuffer, an array built by
 * Request.object()) keeps that managed buffer alive too. So "no export left" means "no view of
 * this memory left", and only then may the memory be reused:
 *  - a payload's arena chunk goes back to the sender (ch_release_chunk) once its Request is done
 *    (replied to, released, deallocated) AND its last export is gone, whichever comes last;
 *  - a lane never allocates over a loan's chunk (committed or cancelled) while an export of that
 *    loan lives (lane_reserve: WouldBlock on that lane only).
 * Nothing is revoked: a view stays valid, and shows its own message's bytes, for as long as it
 * lives (the sender of a loan can still write them: see the loan API). Once a ZBuf's memory is
 * given back it is "spent" and refuses new exports (BufferError), so its object (mv.obj) cannot
 * reach reused memory. memoryview.release() counts as "this view is gone": an array built on
 * that view before (numpy keeps the object, not an export, so nobody can tell) must not be used
 * after it. The mapping under a view stays while its ZBuf lives (ServerSet channel views, Lane
 * pins). */

typedef struct zbuf {
    PyObject_HEAD
    char *buf;
    Py_ssize_t len;
    int readonly;
    int spent;                /* the memory was given back: no new export */
    Py_ssize_t exports;       /* live exports (managed buffers of memoryviews, other consumers) */
    PyObject *owner;          /* strong: the ServerSet (payload) or the Lane (loan) */
    struct chan *ch;          /* payload: its channel, pinned (ch->views) while we live */
    uint64_t seq;             /* payload: its entry in the channel's held-chunk queue */
    int held;                 /* payload: the arena chunk is still held */
    int done;                 /* payload: its Request is finished with it */
    int lane_pin;             /* loan: on the owner Lane's list: its chunk and mapping are kept */
    uint64_t coff, clen;      /* loan: the arena chunk (offset, bytes) no allocation may cover */
    struct zbuf *prev, *next; /* loan: the Lane's pinned buffers */
} ZBufObject;

static PyTypeObject ZBufType;
static PyObject *released_view; /* a released memoryview: what a finished Request's .payload is */
static void zb_last_export(ZBufObject *E);

static int zb_getbuf(ZBufObject *E, Py_buffer *view, int flags)
{
    if (E->spent) {
        view->obj = NULL;
        PyErr_SetString(PyExc_BufferError,
                        "this shared buffer's memory went back to its channel when its last view "
                        "was dropped: keep a view (or a copy) for as long as you need the bytes");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)E, E->buf, E->len, E->readonly, flags) < 0)
        return -1;
    E->exports++;
    return 0;
}

static void zb_releasebuf(ZBufObject *E, Py_buffer *view)
{
    if (--E->exports == 0)
        zb_last_export(E); /* defined with the ZBuf lifetime, after the ServerSet */
}

static PyBufferProcs zb_as_buffer = {(getbufferproc)zb_getbuf, (releasebufferproc)zb_releasebuf};

/* A new ZBuf (owner: a strong reference is taken) and its first memoryview, or NULL. */
static PyObject *zb_view(PyObject *owner, char *buf, uint64_t len, int readonly, ZBufObject **out)
{
    ZBufObject *E = PyObject_New(ZBufObject, &ZBufType);
    if (!E)
        return NULL;
    E->buf = buf;
    E->len = (Py_ssize_t)len;
    E->readonly = readonly;
    E->spent = 0;
    E->exports = 0;
    Py_INCREF(owner);
    E->owner = owner;
    E->ch = NULL;
    E->seq = 0;
    E->held = E->done = E->lane_pin = 0;
    E->coff = E->clen = 0;
    E->prev = E->next = NULL;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)E);
    if (!mv) {
        Py_DECREF(E);
        return NULL;
    }
    *out = E;
    Py_DECREF(E); /* the managed buffer holds it now (and the caller takes its own reference) */
    return mv;
}
