/*
 * _native/errors.h: The capbus._errors classes (handed in by _core.register), the fork check
 * every Lane and ServerSet runs (fork_gen), and the error codes sent in automatic error replies.
 * GIL held.
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_ERRORS_H
#define CAPBUS_NATIVE_ERRORS_H

/* ---------------------------------------------------------------------------------------------
 * capbus._errors classes, handed in once by the runtime (_core.register, in module.c): this
 * module imports no capbus Python module. Every type that can raise them (Lane, ServerSet,
 * EndpointBase, ServiceBase) refuses to be made before that.
 * ------------------------------------------------------------------------------------------- */

static PyObject *IpcError, *Timeout, *PeerDied, *InvalidCapability, *WouldBlock, *MessageTooLarge,
    *ProtocolError, *PermissionDenied, *RateLimitExceeded, *KernelUnavailable, *NoReply;

/* Set by _core.register(): the classes above, the codes below and the object codec are there. */
static int core_ready;

static int core_registered(void)
{
    if (__builtin_expect(core_ready, 1))
        return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "capbus._core.register() has not been called: import capbus._runtime first (its "
                    "runtime hands the error classes and the object codec to the native core)");
    return -1;
}

/* How many fork()s this process descends through (bumped in the child by wd_atfork_child). A Lane
 * or ServerSet belongs to the process that made it: in a forked child it refuses to work (it
 * would share rings and locks with the parent: a second producer on an SPSC ring, a recv lock
 * held by a parent thread that does not exist here). */
static unsigned long fork_gen;

static int check_fork(unsigned long made_in, const char *what)
{
    if (__builtin_expect(made_in == fork_gen, 1))
        return 0;
    PyErr_Format(KernelUnavailable,
                 "this %s belongs to the parent process; a forked child must call "
                 "capbus.connect() for its own connection",
                 what);
    return -1;
}
/* Their .code values, sent in data[0] of the server's automatic error replies. */
static uint64_t code_invalid_capability, code_message_too_large, code_rate_limit, code_no_reply;

#endif /* CAPBUS_NATIVE_ERRORS_H */
