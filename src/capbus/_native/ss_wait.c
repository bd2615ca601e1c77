/*
 * _native/ss_wait.c: The ServerSet's scan and wait: full scan, ready hints, pick, and the wait
 * (spin, futex, sleep eventfd) run by the recv holder with or without the GIL. HOT.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* Full scan: mark every alive channel whose request ring is non-empty (and every draining one)
 * as ready. Called by the recv holder, with or without the GIL. Returns whether anything is.
 * `now`: coarse_ns() at or shortly before the call (recorded as the time of the last scan). */
static HOT int ss_full_scan(ServerSetObject *S, uint64_t now)
{
    int found = 0;
    uint32_t span = ss_span(S);
    for (uint32_t w = 0; w < span; w++) {
        /* ACQUIRE: pairs with add()'s RELEASE, so the channel it names is initialised. */
        uint64_t a = __atomic_load_n(&S->active[w], __ATOMIC_ACQUIRE);
        while (a) {
            uint32_t b = (uint32_t)__builtin_ctzll(a);
            a &= a - 1;
            chan_t *ch = __atomic_load_n(&S->table[w * 64 + b], __ATOMIC_ACQUIRE); /* as above */
            if (!ch)
                continue;
            /* RELAXED: set and cleared under the GIL; a stale value costs one pop (P_EMPTY) or
             * one scan late (the release that clears it also asks for a rescan and kicks). */
            if (__atomic_load_n(&ch->zc_blocked, __ATOMIC_RELAXED))
                continue; /* its held-chunk queue is full: nothing to take until a release */
            /* RELAXED: see remove(); the pop (under the GIL) decides. */
            if (__atomic_load_n(&ch->draining, __ATOMIC_RELAXED)) { /* delivers or retires it */
                S->ready[w] |= 1ull << b;
                found = 1;
                continue;
            }
            if (ctrl_state(ch->ctrl) != STATE_OPEN)
                continue;
            /* RELAXED: a "non-empty?" test only; the pop re-reads the tail with ACQUIRE. */
            if (__atomic_load_n(ring_u64(ch->req.ring, RING_TAIL_OFF), __ATOMIC_RELAXED) !=
                ch->req.head) {
                S->ready[w] |= 1ull << b;
                found = 1;
            }
        }
    }
    S->last_full_scan = now; /* early or a tick late: FULL_SCAN_NS is a lower bound */
    return found;
}

/* Fold the doorbell's hint bits into the private ready set (bits of unknown or dead channels in
 * the span are dropped by the mask -- add() asks for a full scan for that reason; drain slots have
 * no hint bits). */
static HOT void ss_refresh_hints(ServerSetObject *S)
{
    uint64_t *bm = (uint64_t *)(S->db + DB_BITMAP_OFF);
    uint32_t span = ss_span(S);
    /* Words past the span hold only bits of channels not (yet) ours: they stay, for later. */
    for (uint32_t w = 0; w < DB_BITMAP_WORDS && w < span; w++) {
        /* RELAXED: hints only; every use of a channel re-reads its tail with ACQUIRE. The plain
         * load first avoids dirtying 64 shared cache lines per turn. */
        if (__atomic_load_n(&bm[w], __ATOMIC_RELAXED)) {
            uint64_t bits = __atomic_exchange_n(&bm[w], 0, __ATOMIC_RELAXED);
            S->ready[w] |= bits & __atomic_load_n(&S->active[w], __ATOMIC_RELAXED);
        }
    }
}

static HOT int ss_find_from(ServerSetObject *S, uint32_t start)
{
    uint32_t span = ss_span(S);
    for (uint32_t w = start / 64; w < span; w++) {
        uint64_t bits = S->ready[w] & __atomic_load_n(&S->active[w], __ATOMIC_RELAXED);
        if (w == start / 64)
            bits &= ~0ull << (start % 64);
        if (bits)
            return (int)(w * 64 + (uint32_t)__builtin_ctzll(bits));
    }
    return -1;
}

/* Round robin: the next ready channel at or after rr; at the end of a turn, fold in the hints
 * (at most *refreshes times per wait cycle, so a scribbler setting every bit cannot keep us
 * busy) and start again from 0; if nothing is ready at all, scan every ring -- unless the caller
 * goes to ss_wait next (will_wait), which scans every ring itself after its fence. */
static HOT int ss_pick(ServerSetObject *S, int *refreshes, int will_wait)
{
    int i = S->rr < TABLE_SLOTS ? ss_find_from(S, S->rr) : -1;
    if (i >= 0)
        return i;
    if (*refreshes > 0) {
        ss_refresh_hints(S);
        (*refreshes)--;
    }
    S->rr = 0;
    i = ss_find_from(S, 0);
    if (i >= 0 || will_wait)
        return i;
    ss_full_scan(S, coarse_ns());
    return ss_find_from(S, 0);
}

enum { W_AGAIN, W_INTERRUPT, W_EXPIRED };

/* Wait WITHOUT the GIL for work: at most one slice (or, with no deadline or a far one and no
 * spinning left, one untimed sleep under the watchdog), then the caller re-checks everything.
 * W_EXPIRED: the deadline had passed (nothing was scanned). *dl: the deadline, fixed here if
 * DEADLINE_UNSET (see "Lazy deadlines" in common.h). */
static HOT int ss_wait(ServerSetObject *S, uint64_t *dl, int64_t timeout_ns)
{
    uint32_t *seq = (uint32_t *)(S->db + DB_SEQ_OFF);
    uint32_t *sleeping = (uint32_t *)(S->db + DB_SERVER_SLEEPING_OFF);
    uint64_t deadline = *dl;
    int timed = deadline != UINT64_MAX;
    uint64_t start = 0, slice_end = UINT64_MAX;
    if (timed || S->mode != WAIT_BLOCK) { /* block mode with no deadline reads no clock */
        start = now_ns();
        deadline = deadline_fix(dl, timeout_ns, start);
        if (start >= deadline)
            return W_EXPIRED;
    }
    /* A far deadline sleeps as no deadline does: the watchdog ends the sleep in time. */
    int forever = S->mode != WAIT_SPIN && (!timed || deadline - start > DEADLINE_FAR_NS);
    if (forever && !S->wd_registered && wd_register(S) < 0) {
        forever = 0;
        if (!start)
            start = now_ns();
    }
    if (start)
        slice_end = deadline - start > SLICE_NS ? start + SLICE_NS : deadline;
    uint64_t spin_end = start;
    if (S->mode == WAIT_SPIN)
        spin_end = slice_end;
    else if (S->mode == WAIT_ADAPTIVE && spin_allowed(start))
        spin_end = slice_end - start > S->spin_cur ? start + S->spin_cur : slice_end;
    if (spin_end > start) {
        /* ACQUIRE: if a later load sees a different seq we rescan anyway; reading seq BEFORE the
         * scan closes the window where a client publishes between our scan and our read. */
        uint32_t seen = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
        if (ss_full_scan(S, coarse_ns()))
            return W_AGAIN;
        uint64_t next_scan = start + SPIN_SCAN_NS;
        uint64_t *bm = (uint64_t *)(S->db + DB_BITMAP_OFF);
        uint32_t span = ss_span(S);
        for (unsigned i = 1;; i++) {
            if (__atomic_load_n(seq, __ATOMIC_RELAXED) != seen) { /* RELAXED: "look again" */
                S->spin_cur = spin_won(S->spin_cur, S->spin_ns);
                return W_AGAIN;
            }
            /* The hint bits too: clients of a spinning server set only those (server_spins).
             * RELAXED: "look again" as well; a scribbled bit costs one empty turn. */
            for (uint32_t w = 0; w < span && w < DB_BITMAP_WORDS; w++)
                if (__atomic_load_n(&bm[w], __ATOMIC_RELAXED) &
                    __atomic_load_n(&S->active[w], __ATOMIC_RELAXED)) {
                    S->spin_cur = spin_won(S->spin_cur, S->spin_ns);
                    return W_AGAIN;
                }
            if (__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED))
                return W_INTERRUPT;
            cpu_relax();
            if (i % SPIN_CLOCK_EVERY == 0) {
                uint64_t now = now_ns();
                if (now >= spin_end) {
                    if (S->mode == WAIT_ADAPTIVE)
                        S->spin_cur = spin_lost(S->spin_cur);
                    break;
                }
                if (now >= next_scan) { /* a scribbler may hold seq still: trust only rings */
                    if (ss_full_scan(S, coarse_ns()))
                        return W_AGAIN;
                    next_scan = now + SPIN_SCAN_NS;
                }
            }
        }
    }
    uint64_t rel = 0;
    if (!forever) {
        uint64_t now = now_ns();
        if (now >= slice_end)
            return W_AGAIN;
        rel = slice_end - now < SLEEP_CAP_NS ? slice_end - now : SLEEP_CAP_NS;
    }
    kick_slot_t *k;
    if (forever && S->sleep_efd >= 0 && !S->efd_off && (k = kick_mine()) != NULL) {
        /* The eventfd sleep (see "Sleep eventfds and kicks"). Dekker as below, but the wake-up
         * is a counter: a client that saw SLEEP_EFD and wrote after our scan makes the read
         * return at once, so no seq compare is needed (a write we did not need costs one
         * spurious wake-up later). The kick slot, not `asleep`, is the watchdog's view. */
        store_fence_u32(sleeping, SLEEP_EFD);
        if (!ss_full_scan(S, S->coarse_now) && !__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED)) {
            uint64_t v;
            uint32_t t = kick_arm(k);
            ssize_t r = read(S->sleep_efd, &v, sizeof v); /* any outcome: the caller rescans */
            int e = r < 0 ? errno : 0;
            kick_disarm(k, t);
            if (e == EAGAIN)
                S->efd_off = 1; /* someone made it non-blocking: futex sleeps from now on */
        }
        __atomic_store_n(sleeping, SLEEP_NONE, __ATOMIC_RELAXED);
        return __atomic_load_n(&S->interrupt, __ATOMIC_RELAXED) ? W_INTERRUPT : W_AGAIN;
    }
    /* Store + full fence (store_fence_u32), Dekker with lane_ring_doorbell ("bump seq; fence;
     * load sleeping"): either the client sees our flag and wakes us, or our seq load below sees
     * its increment (ACQUIRE: and then its tail) and FUTEX_WAIT returns at once. The scan's clock
     * is the one ss_take read just before (a lower bound for the next full scan either way). */
    store_fence_u32(sleeping, SLEEP_FUTEX);
    uint32_t seen = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
    if (!ss_full_scan(S, S->coarse_now) && !__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED)) {
        if (forever) {
            uint32_t ticket = ++S->sleep_ticket ? S->sleep_ticket : ++S->sleep_ticket;
            __atomic_store_n(&S->asleep, ticket, __ATOMIC_RELAXED); /* see wd_main */
        }
        sys_futex_wait(seq, seen, rel, forever); /* any outcome (EINTR included): caller rescans */
        if (forever)
            __atomic_store_n(&S->asleep, 0, __ATOMIC_RELAXED);
    }
    __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED); /* RELAXED: saves clients a syscall only */
    return __atomic_load_n(&S->interrupt, __ATOMIC_RELAXED) ? W_INTERRUPT : W_AGAIN;
}
