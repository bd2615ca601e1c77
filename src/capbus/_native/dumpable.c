/*
 * _native/dumpable.c: set_dumpable / dumpable, the process's own prctl(PR_SET_DUMPABLE) (what
 * capbus._protect uses to keep processes of the same uid out of this one). GIL held.
 * Not compiled alone: module.c and layout_module.c (capbus._layout) #include it (see there).
 */

/* prctl(PR_SET_DUMPABLE): here rather than through ctypes, which every capbus process would then
 * import (and load libc through) only for this; os has no prctl. */
static PyObject *py_set_dumpable(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (prctl(PR_SET_DUMPABLE, on ? 1 : 0, 0, 0, 0) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_dumpable(PyObject *self, PyObject *unused)
{
    int r = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(r == 1);
}

/* Its entry in a module's method table (capbus._core and capbus._layout share it). */
#define METHOD_SET_DUMPABLE \
    {"set_dumpable", py_set_dumpable, METH_O, \
        "set_dumpable(flag) -> None   prctl(PR_SET_DUMPABLE, flag): with False, processes of the " \
        "same uid can no longer ptrace this one, read its /proc/<pid>/mem, open its /proc/<pid>/fd " \
        "or take its fds with pidfd_getfd, and it leaves no core dump"}
