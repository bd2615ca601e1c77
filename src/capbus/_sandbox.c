/*
 * capbus._sandbox -- the native half of sandboxed launch (Landlock, seccomp, prctl).
 *
 * Why native and not a binding: Landlock has no syscall wrappers in Python (ctypes would run a
 * foreign-function call, allocation-heavy, in the forked child), and libseccomp's Python binding
 * is no maintained wheel on PyPI (it builds against libseccomp headers). The seccomp filter here
 * is a fixed denylist plus a few argument checks: some dozens of lines of classic BPF.
 *
 * Python-visible API (internal; src/capbus/_kernel/sandbox.py is its only user):
 *   landlock_abi() -> int     the running kernel's Landlock ABI version, 0 if Landlock is absent
 *       or disabled
 *   seccomp_supported() -> bool   seccomp filters work here and this build knows the arch
 *   landlock_ruleset(read_paths, write_paths, exec_paths, network, scope) -> fd
 *       Built in the PARENT: every path is opened O_PATH here, so the child does no path work.
 *       Handles every filesystem right of the running ABI (nothing left unrestricted; on an
 *       ABI newer than this file, the rights it accepts beyond ours are handled and so
 *       denied: fail closed), and with network=False both TCP rights (ABI >= 4, else
 *       OSError), with scope=True abstract unix sockets and signals (ABI >= 6, else OSError).
 *       read: READ_FILE | READ_DIR; exec: read + EXECUTE; write: read + write, create, remove,
 *       rename (REFER), truncate; never device nodes, sockets or execute. A rule on a file (not a
 *       directory) keeps only the rights a file can have. OSError (with the path) if one cannot
 *       be opened. The fd is O_CLOEXEC; the caller closes it after the child is started.
 *   handled_rights(network=False, scope=True) -> (fs, net, scoped)   what such a ruleset
 *       handles on this kernel; accepted_rights() -> (fs, net, scoped): every bit the kernel
 *       accepts, probed one at a time (the tests hold the two equal: nothing left unhandled)
 *   enter(ruleset_fd, network, dumpable=False) -> None
 *       In the CHILD (subprocess's preexec_fn, after its setgroups/setgid/setuid): no_new_privs,
 *       dumpable 0, landlock_restrict_self, close(ruleset_fd), then the seccomp filter. Only
 *       syscalls and no allocation unless one fails (then OSError, and Popen kills the child).
 *       ruleset_fd < 0: no Landlock (callers refuse such a sandbox before they get here).
 *   (execve resets the dumpable 0 that enter() set, to 1 for a program that is not set-id: the
 *   runtime of a sandboxed child sets it again with _core.set_dumpable as it connects.)
 *
 * The seccomp filter (default allow; build_filter says it in full): a foreign arch is killed
 * (x86-64 / AArch64 checked; on x86-64 every x32 syscall is refused); the denylist below gets
 * EPERM; socket() of AF_UNIX gets EPERM (socketpair stays, stream and seqpacket only: Python
 * and asyncio use it), and with network=False socket() of every family does; calls that act
 * on another process by pid (prlimit64, sched_set*, setpriority, ioprio_set,
 * migrate/move_pages) only on 0 (itself);
 * clone with namespace flags and clone3 (flags unreadable) refused; TIOCSTI/TIOCLINUX refused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Landlock's UAPI, spelled out: the build host's headers may predate the running kernel. */
#define LL_CREATE_RULESET_VERSION (1U << 0)
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_EXECUTE (1ULL << 0)
#define LL_FS_WRITE_FILE (1ULL << 1)
#define LL_FS_READ_FILE (1ULL << 2)
#define LL_FS_READ_DIR (1ULL << 3)
#define LL_FS_REMOVE_DIR (1ULL << 4)
#define LL_FS_REMOVE_FILE (1ULL << 5)
#define LL_FS_MAKE_CHAR (1ULL << 6)
#define LL_FS_MAKE_DIR (1ULL << 7)
#define LL_FS_MAKE_REG (1ULL << 8)
#define LL_FS_MAKE_SOCK (1ULL << 9)
#define LL_FS_MAKE_FIFO (1ULL << 10)
#define LL_FS_MAKE_BLOCK (1ULL << 11)
#define LL_FS_MAKE_SYM (1ULL << 12)
#define LL_FS_REFER (1ULL << 13)     /* ABI 2 */
#define LL_FS_TRUNCATE (1ULL << 14)  /* ABI 3 */
#define LL_FS_IOCTL_DEV (1ULL << 15) /* ABI 5 */
#define LL_NET_BIND_TCP (1ULL << 0)    /* ABI 4 */
#define LL_NET_CONNECT_TCP (1ULL << 1) /* ABI 4 */
#define LL_SCOPE_ABSTRACT_UNIX (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)        /* ABI 6 */
/* ABI 7 added audit-logging flags, no access right: the highest ABI whose rights we know. */
#define LL_KNOWN_ABI 7

/* Rights a rule on a non-directory may carry (others make landlock_add_rule fail EINVAL). */
#define LL_FS_FILE_RIGHTS (LL_FS_EXECUTE | LL_FS_WRITE_FILE | LL_FS_READ_FILE | LL_FS_TRUNCATE | \
                           LL_FS_IOCTL_DEV)
#define LL_READ (LL_FS_READ_FILE | LL_FS_READ_DIR)
#define LL_WRITE (LL_READ | LL_FS_WRITE_FILE | LL_FS_REMOVE_DIR | LL_FS_REMOVE_FILE | \
                  LL_FS_MAKE_DIR | LL_FS_MAKE_REG | LL_FS_MAKE_FIFO | LL_FS_MAKE_SYM | \
                  LL_FS_REFER | LL_FS_TRUNCATE)

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net; /* ABI 4 */
    uint64_t scoped;             /* ABI 6 */
};

struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif

static int ll_abi(void) {
    long v = syscall(__NR_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    return v < 0 ? 0 : (int)v;
}

static uint64_t ll_handled_fs(int abi) {
    uint64_t fs = (LL_FS_MAKE_SYM << 1) - 1; /* ABI 1: bits 0..12 */
    if (abi >= 2) fs |= LL_FS_REFER;
    if (abi >= 3) fs |= LL_FS_TRUNCATE;
    if (abi >= 5) fs |= LL_FS_IOCTL_DEV;
    return fs;
}

/* On a kernel newer than this file (ABI > LL_KNOWN_ABI): the rights of `field` (0 fs, 1 net,
 * 2 scoped) from bit `from` up that it accepts. Handled with no rule granting them, they are
 * denied: a right we cannot name is refused, never left open. */
static uint64_t ll_unknown_rights(int field, int from) {
    uint64_t found = 0;
    for (int bit = from; bit < 64; bit++) {
        struct ll_ruleset_attr attr = {0};
        uint64_t *slot = field == 0 ? &attr.handled_access_fs
                       : field == 1 ? &attr.handled_access_net : &attr.scoped;
        *slot = 1ULL << bit;
        long fd = syscall(__NR_landlock_create_ruleset, &attr, sizeof attr, 0);
        if (fd >= 0) {
            found |= 1ULL << bit;
            close((int)fd);
        }
    }
    return found;
}

/* The rights a ruleset handles on this kernel (ABI `abi`): every filesystem right, TCP unless
 * `network`, both scopes if `scope`. -1 with an exception if the ABI lacks what is asked. */
static int ll_handled(int abi, int network, int scope, struct ll_ruleset_attr *attr, size_t *size) {
    int newer = abi > LL_KNOWN_ABI;
    memset(attr, 0, sizeof *attr);
    attr->handled_access_fs = ll_handled_fs(abi);
    if (newer) attr->handled_access_fs |= ll_unknown_rights(0, 16);
    *size = sizeof(uint64_t);
    if (!network) {
        if (abi < 4) {
            PyErr_Format(PyExc_OSError, "Landlock ABI %d cannot restrict TCP (needs 4)", abi);
            return -1;
        }
        attr->handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP;
        if (newer) attr->handled_access_net |= ll_unknown_rights(1, 2);
        *size = 2 * sizeof(uint64_t);
    }
    if (scope) {
        if (abi < 6) {
            PyErr_Format(PyExc_OSError, "Landlock ABI %d cannot scope signals and abstract "
                         "unix sockets (needs 6)", abi);
            return -1;
        }
        attr->scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
        if (newer) attr->scoped |= ll_unknown_rights(2, 2);
        *size = sizeof *attr;
    }
    return 0;
}

static PyObject *py_handled_rights(PyObject *self, PyObject *args) {
    int network = 0, scope = 1;
    if (!PyArg_ParseTuple(args, "|pp", &network, &scope)) return NULL;
    struct ll_ruleset_attr attr;
    size_t size;
    if (ll_handled(ll_abi(), network, scope, &attr, &size) < 0) return NULL;
    return Py_BuildValue("KKK", (unsigned long long)attr.handled_access_fs,
                         (unsigned long long)attr.handled_access_net,
                         (unsigned long long)attr.scoped);
}

static PyObject *py_accepted_rights(PyObject *self, PyObject *unused) {
    return Py_BuildValue("KKK", (unsigned long long)ll_unknown_rights(0, 0),
                         (unsigned long long)ll_unknown_rights(1, 0),
                         (unsigned long long)ll_unknown_rights(2, 0));
}

static PyObject *py_landlock_abi(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(ll_abi());
}

/* Add one O_PATH rule per path of `seq` with `rights` (masked to what the ABI handles and, for
 * a non-directory, to file rights). -1 with an exception set on failure. */
static int add_rules(int ruleset, PyObject *seq, uint64_t rights, uint64_t handled) {
    PyObject *fast = PySequence_Fast(seq, "paths must be a sequence of str");
    if (fast == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *bytes = NULL;
        if (!PyUnicode_FSConverter(item, &bytes)) goto fail;
        const char *path = PyBytes_AS_STRING(bytes);
        int fd = open(path, O_PATH | O_CLOEXEC);
        if (fd < 0) {
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, item);
            Py_DECREF(bytes);
            goto fail;
        }
        struct stat st;
        uint64_t allowed = rights & handled;
        if (fstat(fd, &st) == 0 && !S_ISDIR(st.st_mode)) allowed &= LL_FS_FILE_RIGHTS;
        struct ll_path_beneath_attr attr = {.allowed_access = allowed, .parent_fd = fd};
        long r = syscall(__NR_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &attr, 0);
        int err = errno;
        close(fd);
        if (r < 0) {
            errno = err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, item);
            Py_DECREF(bytes);
            goto fail;
        }
        Py_DECREF(bytes);
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    return -1;
}

static PyObject *py_landlock_ruleset(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"read_paths", "write_paths", "exec_paths", "network", "scope", NULL};
    PyObject *rd, *wr, *ex;
    int network, scope;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOpp", kwlist, &rd, &wr, &ex, &network, &scope))
        return NULL;
    int abi = ll_abi();
    if (abi < 1) {
        errno = EOPNOTSUPP;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct ll_ruleset_attr attr;
    size_t size;
    if (ll_handled(abi, network, scope, &attr, &size) < 0) return NULL;
    int ruleset = (int)syscall(__NR_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0) return PyErr_SetFromErrno(PyExc_OSError);
    uint64_t h = attr.handled_access_fs;
    if (add_rules(ruleset, rd, LL_READ, h) < 0 ||
        add_rules(ruleset, ex, LL_READ | LL_FS_EXECUTE, h) < 0 ||
        add_rules(ruleset, wr, LL_WRITE, h) < 0) {
        close(ruleset);
        return NULL;
    }
    return PyLong_FromLong(ruleset);
}

/* ---- seccomp ------------------------------------------------------------------------------ */

#if defined(__x86_64__)
#define SB_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SB_ARCH AUDIT_ARCH_AARCH64
#endif

#ifdef SB_ARCH
/* Refused with EPERM. Other processes' memory and fds (ptrace,
 * process_vm_*, pidfd_getfd, process_madvise), mounts (old and new API), kernel code and
 * objects (bpf, perf, kexec, modules, keyrings), userfaultfd (a race amplifier); and
 * io_uring (its IORING_OP_SOCKET/CONNECT would make sockets past the socket() check below),
 * namespaces (unshare/setns: a user namespace hands out capabilities), and the admin calls a
 * child running as root could otherwise make (reboot, swap, clocks, hostname, chroot,
 * open_by_handle_at, acct, quotactl, syslog, fanotify). */
static const int denied[] = {
    __NR_ptrace, __NR_process_vm_readv, __NR_process_vm_writev,
#ifdef __NR_pidfd_getfd
    __NR_pidfd_getfd,
#endif
#ifdef __NR_process_madvise
    __NR_process_madvise,
#endif
    __NR_mount, __NR_umount2, __NR_pivot_root,
#ifdef __NR_fsopen
    __NR_fsopen, __NR_fsconfig, __NR_fsmount, __NR_fspick, __NR_move_mount, __NR_open_tree,
#endif
#ifdef __NR_mount_setattr
    __NR_mount_setattr,
#endif
    __NR_bpf, __NR_perf_event_open, __NR_kexec_load,
#ifdef __NR_kexec_file_load
    __NR_kexec_file_load,
#endif
    __NR_init_module, __NR_finit_module, __NR_delete_module,
    __NR_keyctl, __NR_add_key, __NR_request_key, __NR_userfaultfd,
#ifdef __NR_io_uring_setup
    __NR_io_uring_setup, __NR_io_uring_enter, __NR_io_uring_register,
#endif
    __NR_unshare, __NR_setns,
    __NR_reboot, __NR_swapon, __NR_swapoff, __NR_settimeofday, __NR_clock_settime,
    __NR_clock_adjtime, __NR_adjtimex, __NR_sethostname, __NR_setdomainname, __NR_chroot,
    __NR_open_by_handle_at, __NR_acct, __NR_quotactl, __NR_syslog, __NR_fanotify_init,
#if defined(__x86_64__)
    __NR_iopl, __NR_ioperm,
#endif
};
#define NDENIED (sizeof denied / sizeof denied[0])
#endif

static int seccomp_ok(void) {
#ifdef SB_ARCH
    return prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0;
#else
    return 0;
#endif
}

static PyObject *py_seccomp_supported(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(seccomp_ok());
}

#ifdef SB_ARCH
/* A tiny assembler for forward jumps to labels (classic BPF jumps only forward, by u8). */
enum { L_NONE = -1, L_ALLOW, L_DENY, L_ENOSYS, L_SOCK, L_PAIR, L_PID0, L_PRIO, L_IOPRIO,
       L_IOCTL, L_CLONE, L_COUNT };
#define MAX_INSNS (NDENIED + 64)
struct prog {
    struct sock_filter f[MAX_INSNS];
    signed char jt[MAX_INSNS], jf[MAX_INSNS]; /* label ids, or L_NONE for a literal 0 */
    int at[L_COUNT];
    int n;
};

static void stmt(struct prog *p, uint16_t code, uint32_t k) {
    p->f[p->n] = (struct sock_filter)BPF_STMT(code, k);
    p->jt[p->n] = p->jf[p->n] = L_NONE;
    p->n++;
}

/* if (A == k) goto jt else goto jf (L_NONE: the next instruction) */
static void jeq(struct prog *p, uint32_t k, int jt, int jf) {
    p->f[p->n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, k, 0, 0);
    p->jt[p->n] = (signed char)jt;
    p->jf[p->n] = (signed char)jf;
    p->n++;
}

static void jump(struct prog *p, uint16_t op, uint32_t k, int jt, int jf) {
    jeq(p, k, jt, jf);
    p->f[p->n - 1].code = BPF_JMP | op | BPF_K;
}

static void label(struct prog *p, int l) { p->at[l] = p->n; }

static void ld_arg(struct prog *p, int i) { /* little-endian: the low 32 bits of args[i] */
    stmt(p, BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]) + 8 * i);
}

/* Resolve the labels; -1 if a jump would go backwards or too far. */
static int resolve(struct prog *p) {
    for (int i = 0; i < p->n; i++) {
        int labels[2] = {p->jt[i], p->jf[i]};
        for (int w = 0; w < 2; w++) {
            if (labels[w] == L_NONE) continue;
            int off = p->at[labels[w]] - (i + 1);
            if (off < 0 || off > 255) return -1;
            if (w == 0) p->f[i].jt = (uint8_t)off;
            else p->f[i].jf = (uint8_t)off;
        }
    }
    return p->n;
}

#define RET_ERR(e) (SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))
#define CLONE_NS_FLAGS 0x7E020000U /* NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET */
#define SB_TIOCSTI 0x5412U   /* push input into a terminal: the kernel's own tty if inherited */
#define SB_TIOCLINUX 0x541CU /* the same on a virtual console (selection paste) */

/* The filter, all returns at the end (jumps only go forward):
 *   arch != ours -> KILL_PROCESS; x32 -> EPERM; the denylist -> EPERM; socketpair of a type
 *   other than STREAM or SEQPACKET -> EPERM (a datagram end could sendto() any named socket by
 *   path, and Landlock cannot stop that; SOCK_RAW is a datagram socket in AF_UNIX); clone3 -> ENOSYS (its
 *   flags sit in memory a filter cannot read: libc falls back to clone); clone with a
 *   namespace flag -> EPERM; socket(AF_UNIX) -> EPERM, any other family -> network ? allow :
 *   EPERM; prlimit64, sched_set{affinity,scheduler,param,attr}, migrate_pages, move_pages on a
 *   pid other than 0 (this thread) -> EPERM (a same-uid child could lower the kernel's limits
 *   or starve it with SCHED_IDLE); setpriority / ioprio_set other than (PROCESS, 0) -> EPERM;
 *   ioctl TIOCSTI / TIOCLINUX -> EPERM. */
static int build_filter(struct prog *p, int network) {
    p->n = 0;
    stmt(p, BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    jeq(p, SB_ARCH, L_NONE, L_NONE);
    p->f[p->n - 1].jt = 1; /* skip the kill */
    stmt(p, BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    stmt(p, BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
#if defined(__x86_64__)
    jump(p, BPF_JGE, 0x40000000U /* __X32_SYSCALL_BIT */, L_DENY, L_NONE);
#endif
    jeq(p, __NR_socket, L_SOCK, L_NONE);
    jeq(p, __NR_socketpair, L_PAIR, L_NONE);
    jeq(p, __NR_prlimit64, L_PID0, L_NONE);
    jeq(p, __NR_sched_setaffinity, L_PID0, L_NONE);
    jeq(p, __NR_sched_setscheduler, L_PID0, L_NONE);
    jeq(p, __NR_sched_setparam, L_PID0, L_NONE);
#ifdef __NR_sched_setattr
    jeq(p, __NR_sched_setattr, L_PID0, L_NONE);
#endif
    jeq(p, __NR_migrate_pages, L_PID0, L_NONE);
    jeq(p, __NR_move_pages, L_PID0, L_NONE);
    jeq(p, __NR_setpriority, L_PRIO, L_NONE);
    jeq(p, __NR_ioprio_set, L_IOPRIO, L_NONE);
    jeq(p, __NR_ioctl, L_IOCTL, L_NONE);
    jeq(p, __NR_clone, L_CLONE, L_NONE);
#ifdef __NR_clone3
    jeq(p, __NR_clone3, L_ENOSYS, L_NONE);
#endif
    for (size_t i = 0; i < NDENIED; i++) jeq(p, (uint32_t)denied[i], L_DENY, L_NONE);
    jump(p, BPF_JA, 0, L_NONE, L_NONE);
    int ja = p->n - 1; /* to ALLOW: patched below (BPF_JA's offset is k) */

    label(p, L_SOCK);
    ld_arg(p, 0);
    jeq(p, AF_UNIX, L_DENY, network ? L_ALLOW : L_DENY);
    label(p, L_PAIR); /* the type, less SOCK_NONBLOCK / SOCK_CLOEXEC */
    ld_arg(p, 1);
    stmt(p, BPF_ALU | BPF_AND | BPF_K, 0xF);
    jeq(p, SOCK_STREAM, L_ALLOW, L_NONE);
    jeq(p, SOCK_SEQPACKET, L_ALLOW, L_DENY);
    label(p, L_PID0);
    ld_arg(p, 0);
    jeq(p, 0, L_ALLOW, L_DENY);
    label(p, L_PRIO);
    ld_arg(p, 0);
    jeq(p, 0 /* PRIO_PROCESS */, L_NONE, L_DENY);
    ld_arg(p, 1);
    jeq(p, 0, L_ALLOW, L_DENY);
    label(p, L_IOPRIO);
    ld_arg(p, 0);
    jeq(p, 1 /* IOPRIO_WHO_PROCESS */, L_NONE, L_DENY);
    ld_arg(p, 1);
    jeq(p, 0, L_ALLOW, L_DENY);
    label(p, L_IOCTL);
    ld_arg(p, 1);
    jeq(p, SB_TIOCSTI, L_DENY, L_NONE);
    jeq(p, SB_TIOCLINUX, L_DENY, L_ALLOW);
    label(p, L_CLONE);
    ld_arg(p, 0);
    jump(p, BPF_JSET, CLONE_NS_FLAGS, L_DENY, L_ALLOW);

    label(p, L_ALLOW);
    stmt(p, BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    label(p, L_DENY);
    stmt(p, BPF_RET | BPF_K, RET_ERR(EPERM));
    label(p, L_ENOSYS);
    stmt(p, BPF_RET | BPF_K, RET_ERR(ENOSYS));
    p->f[ja].k = (uint32_t)(p->at[L_ALLOW] - (ja + 1));
    return resolve(p);
}
#endif

static PyObject *py_enter(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ruleset_fd", "network", "dumpable", NULL};
    int ruleset, network, dumpable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ip|p", kwlist, &ruleset, &network, &dumpable))
        return NULL;
#ifndef SB_ARCH
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
#else
    struct prog p; /* on the stack: nothing allocated in the forked child */
    int len = build_filter(&p, network);
    if (len < 0) {
        errno = E2BIG;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct sock_fprog prog = {.len = (unsigned short)len, .filter = p.f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    if (prctl(PR_SET_DUMPABLE, dumpable ? 1 : 0, 0, 0, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (ruleset >= 0) {
        if (syscall(__NR_landlock_restrict_self, ruleset, 0) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        close(ruleset);
    }
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
#endif
}

static PyMethodDef sandbox_methods[] = {
    {"handled_rights", py_handled_rights, METH_VARARGS,
     "handled_rights(network=False, scope=True) -> (fs, net, scoped) a ruleset handles here"},
    {"accepted_rights", py_accepted_rights, METH_NOARGS,
     "(fs, net, scoped): every right bit this kernel's Landlock accepts (probed one by one)"},
    {"landlock_abi", py_landlock_abi, METH_NOARGS, "The running kernel's Landlock ABI (0: none)."},
    {"seccomp_supported", py_seccomp_supported, METH_NOARGS,
     "True if seccomp filters work here and this build knows the CPU arch."},
    {"landlock_ruleset", (PyCFunction)(void (*)(void))py_landlock_ruleset,
     METH_VARARGS | METH_KEYWORDS,
     "landlock_ruleset(read_paths, write_paths, exec_paths, network, scope) -> fd"},
    {"enter", (PyCFunction)(void (*)(void))py_enter, METH_VARARGS | METH_KEYWORDS,
     "enter(ruleset_fd, network, dumpable=False): confine this (forked) process for good."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sandbox_module = {
    PyModuleDef_HEAD_INIT, "capbus._sandbox",
    "Landlock rulesets and the seccomp filter of sandboxed launch (see _kernel/sandbox.py).",
    -1, sandbox_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sandbox(void) {
    PyObject *m = PyModule_Create(&sandbox_module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "KNOWN_ABI", LL_KNOWN_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
