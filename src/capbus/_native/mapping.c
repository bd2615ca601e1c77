/*
 * _native/mapping.c: Validating and mapping the kernel's memfds (sealed against shrinking, big
 * enough), the wait-mode check (the geometry check is in helpers.c). GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */

/* ---- Validating and mapping the kernel's memfds. ---------------------------------------------
 * A peer holding a writable fd of a memfd could ftruncate it under us, and touching a page past
 * EOF is SIGBUS, i.e. a crashed server. So every memfd we map must carry F_SEAL_SHRINK (we add
 * it if the memfd allows sealing; create memfds with MFD_ALLOW_SEALING, as capbus._kernel.shm
 * does). The seal goes on first and the size is checked after, so no shrink can slip
 * in between. */
static void *map_memfd(int fd, uint64_t need, int writable, const char *what)
{
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
            PyErr_Format(PyExc_ValueError,
                         "the %s fd must be a memfd sealed against shrinking (create it with "
                         "os.MFD_ALLOW_SEALING, as capbus._kernel.shm does)",
                         what);
            return NULL;
        }
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < need) {
        PyErr_Format(PyExc_ValueError, "the %s memfd has %lld bytes, needs %llu", what,
                     (long long)st.st_size, (unsigned long long)need);
        return NULL;
    }
    if (need > SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "mapping too large");
        return NULL;
    }
    /* MAP_NORESERVE: the arenas are huge and sparse; only touched pages cost memory. */
    void *p = mmap(NULL, (size_t)need, writable ? PROT_READ | PROT_WRITE : PROT_READ,
                   MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    return p;
}

static int check_wait(int mode, long long spin_ns)
{
    if (mode < WAIT_SPIN || mode > WAIT_BLOCK) {
        PyErr_SetString(PyExc_ValueError, "wait_mode must be 0 (spin), 1 (adaptive) or 2 (block)");
        return -1;
    }
    if (spin_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "spin_ns must be >= 0");
        return -1;
    }
    return 0;
}
