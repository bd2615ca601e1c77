/*
 * _native/ss_reply.c: Writing a reply into a channel's response ring (its lock held; the copy of a
 * big payload without the GIL) and the outcome as a Python result. HOT.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* Write one reply into ch's response ring; never blocks. GIL held on entry and exit (a big
 * payload's copy, and a contended lock, run without it). RG_OK, RG_FULL, or RG_CORRUPT (ch is
 * then marked dead). If remove() ran meanwhile and no recv is active, ch is freed on return: the
 * caller must not use it afterwards (recv's own auto-replies may: recv_active keeps it). `app`:
 * the application's reply (counted in the metrics), not an automatic refusal; APP_REPLY_DEFER:
 * and a corrupt ring is reported by the next recv (ss_defer_report), not raised by the caller. */
enum { APP_REPLY = 1, APP_REPLY_DEFER = 2 };
/* The write itself, with ch->lock held (with or without the GIL); lets the lock go. */
static HOT int reply_write_locked(chan_t *ch, const outmsg_t *m, const char **why)
{
    uint64_t nfree;
    int r = prod_slots_free(&ch->resp, 1, &nfree, why);
    if (r == RG_OK)
        r = nfree ? prod_write(&ch->resp, m, why) : RG_FULL;
    if (r == RG_OK)
        prod_publish_fence(&ch->resp);
    gl_release(&ch->lock);
    return r;
}

static HOT int ss_write_reply(ServerSetObject *S, chan_t *ch, const outmsg_t *m, const char **why,
                          int app)
{
    int r;
    ch->users++;
    /* The lock is taken with the GIL (waiting without it while another thread copies a big
     * reply); a big payload is then copied without the GIL, and the lock let go before the GIL
     * is taken back, so its holder never waits for the GIL: no deadlock. */
    gl_acquire(&ch->lock);
    if (m->payload && m->plen >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = reply_write_locked(ch, m, why);
        Py_END_ALLOW_THREADS
    } else {
        r = reply_write_locked(ch, m, why);
    }
    if (r == RG_OK) {
        /* The full fence after our tail store (prod_publish_fence) orders it before the loads
         * of the client's flags: the Dekker half matching lane_wait (sleeping) and
         * call_poll(arm=True) (event). RELAXED loads; both flags share the consumer's cache
         * line. The flags are client-written: a hostile value costs that client a spurious
         * wake-up. */
        char *ring = ch->resp.ring;
        uint32_t sleeping = __atomic_load_n(ring_u32(ring, RING_CONSUMER_SLEEPING_OFF),
                                            __ATOMIC_RELAXED);
        if (sleeping == SLEEP_EFD && ch->rs_wfd >= 0) {
            if (write(ch->rs_wfd, "", 1) < 0) {
                /* EAGAIN: the pipe is full, so the client wakes anyway (rs_keep: no EPIPE) */
            }
        } else if (sleeping) {
            sys_futex_wake((const uint32_t *)ring_u64(ring, RING_TAIL_OFF), INT_MAX);
        }
        if (ch->reply_efd >= 0 &&
            __atomic_load_n(ring_u32(ring, RING_CONSUMER_EVENT_OFF), __ATOMIC_RELAXED))
            efd_signal(ch->reply_efd);
        if (app)
            stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLIES_OFF, 1);
    } else if (app) {
        stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
    }
    ch->users--;
    if (r == RG_CORRUPT && !ch->removed) {
        ss_mark_dead(S, ch);
        if (app == APP_REPLY_DEFER)
            ss_defer_report(S, ch, *why);
    }
    if (ch->removed)
        ss_reap(S); /* may free ch */
    return r;
}

static HOT PyObject *reply_outcome(int r, uint32_t index, const char *why)
{
    if (r == RG_OK)
        Py_RETURN_NONE;
    if (r == RG_FULL)
        PyErr_Format(WouldBlock, "response ring or arena of channel %u is full", index);
    else
        raise_corrupt(index, why);
    return NULL;
}
