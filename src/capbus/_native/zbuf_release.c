/*
 * _native/zbuf_release.c: ZBuf lifetime: a zero-copy payload's chunk goes back to its owner (the
 * ServerSet's held-chunk queue, or a Lane's pins) when its Request is done and its last view is
 * gone; ZBufType. GIL held. Comes after the ServerSet, whose queue it releases to.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- ZBuf lifetime (the type is described with the views of shared memory, before Lane). ---- */

/* A zero-copy payload's chunk is released (GIL held; idempotent): its Request is done and no view
 * is left. A removed or dead channel's ring is read by nobody any more: nothing to publish. */
static void zb_release_chunk(ZBufObject *E)
{
    if (!E->held)
        return;
    E->held = 0;
    E->spent = 1;
    chan_t *ch = E->ch;
    if (ch->removed || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED))
        return;
    /* A forked child dropping the views it inherited: the ring and its held chunks are the
     * parent's, which may still be reading them. */
    if (((ServerSetObject *)E->owner)->fork_gen != fork_gen)
        return;
    ch_release_chunk((ServerSetObject *)E->owner, ch, E->seq);
}

/* The last export of E is gone (GIL held; from zb_releasebuf, so wherever a view dies). */
static void zb_last_export(ZBufObject *E)
{
    if (E->ch && E->done)
        zb_release_chunk(E);
    else if (E->lane_pin) {
        E->spent = 1;
        lane_unpin((LaneObject *)E->owner, E);
    }
}

static void zb_dealloc(ZBufObject *E)
{
    if (E->ch) {
        chan_t *ch = E->ch;
        zb_release_chunk(E); /* normally done by its Request already */
        if (--ch->views == 0 && ch->removed)
            ss_reap((ServerSetObject *)E->owner); /* may unmap and free ch */
    }
    if (E->lane_pin)
        lane_unpin((LaneObject *)E->owner, E);
    Py_XDECREF(E->owner);
    PyObject_Free(E);
}

static PyTypeObject ZBufType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.SharedBuffer",
    .tp_basicsize = sizeof(ZBufObject),
    .tp_dealloc = (destructor)zb_dealloc,
    .tp_as_buffer = &zb_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Shared memory behind a zero-copy payload or a loan; the memory is kept for as "
              "long as any view of it lives.",
};
