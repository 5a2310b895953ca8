/* pyengine.c — aem._core.Engine: registration, delivery, run, async delivery.
 *
 * Delivery of one occurrence (deliver_one):
 *   registration finished? (one-shot timer, EVF_ONESHOT, Close, ChildExit)
 *        -> unregistered first, so the handler sees itself gone
 *   kind work: accept() the connections, recv() the data, reap the child ...
 *   constructor(event) -> handler(event) | spawn hook (EVF_FORK/EVF_CAPSULE)
 *        -> destructor(event) (also when the handler raised)
 *   an Exception from any of them is counted and given to the error handler;
 *   a BaseException (KeyboardInterrupt, SystemExit) propagates to the caller
 *   of run() or to the interrupted main thread.
 *
 * Two ways to drive the engine:
 *   run():   the calling thread waits in epoll_wait (GIL released) and delivers.
 *   start(): the doorbell thread (doorbell.c) waits; when something is ready
 *            it schedules one pending call and pthread_kills the main thread
 *            with the kick signal, whose Python-level handler also drains:
 *            a busy main thread takes the pending call at its next bytecode
 *            boundary, a blocked one returns from its syscall with EINTR and
 *            runs the signal handler before retrying (PEP 475).
 */
#define _GNU_SOURCE
#include "pyaem.h"
#include "vmtable_py.h"
#include "handoff.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <structmember.h>
#include <sys/un.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

PyTypeObject *AemEngine_Type;

/* The engine in asynchronous mode (one per process: the kick signal is process-wide). */
static EngineObject *async_engine;
static int kick_signum;

static const char *kind_names[AEM_K__COUNT] = {
    "none", "timer", "readable", "writable", "accept", "read", "close", "signal",
    "child", "job", "file", "user", "pressure", "custom", "hosted",
};

/* ---- host hooks for the C engine ------------------------------------------------ */

static void host_release(void *obj) { Py_XDECREF((PyObject *)obj); }

static void *host_make_name(const char *name, size_t len) {
    PyObject *s = PyUnicode_DecodeFSDefaultAndSize(name, (Py_ssize_t)len);
    if (!s) PyErr_Clear();
    return s;
}

static const aem_host python_host = {.release = host_release, .make_name = host_make_name};

/* ---- helpers ---------------------------------------------------------------------- */

static int check_open(EngineObject *self) {
    if (self->closed) {
        PyErr_SetString(AemError, "this aem engine is closed (or belongs to the parent of a forked process)");
        return -1;
    }
    return 0;
}

static PyObject *set_errno_error(int neg_errno, const char *what) {
    errno = -neg_errno;
    PyObject *exc = PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
    return exc;
}

static int parse_eid(PyObject *arg, uint64_t *eid) {
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "event id must be an int, not %.100s", Py_TYPE(arg)->tp_name);
        return -1;
    }
    *eid = PyLong_AsUnsignedLongLong(arg);
    if (*eid == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(AemUnknownEvent, "no registered event with id %R", arg);
        return -1;
    }
    return 0;
}

static aem_reg *lookup_or_raise(EngineObject *self, PyObject *eid_obj, uint64_t *eid, uint32_t *slot) {
    if (parse_eid(eid_obj, eid) < 0) return NULL;
    aem_reg *r = aem_engine_lookup(&self->core, *eid, slot);
    if (!r) PyErr_Format(AemUnknownEvent, "no registered event with id %R", eid_obj);
    return r;
}

#define AEM_F_INTERNAL 0x200u  /* the engine's own plumbing: not counted for idleness */
static inline int is_internal(const aem_reg *r) { return r->flags & AEM_F_INTERNAL; }

static inline uint32_t user_live(EngineObject *self) { return self->core.live - self->internal; }

static void direct_kick(EngineObject *self, int fd, int on);

/* The registration delivered normally: its run of failures (if any) ends. */
static void forget_failures(EngineObject *self, uint64_t eid) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *key = PyLong_FromUnsignedLongLong(eid);
    if (!key || PyDict_DelItem(self->failures, key) < 0) PyErr_Clear();
    Py_XDECREF(key);
    PyErr_Restore(type, value, tb);
}

static inline void source_ok(EngineObject *self, uint64_t eid) {
    if (self->failures && PyDict_GET_SIZE(self->failures)) forget_failures(self, eid);
}

/* Release a registration's references and slot.  The unregister hook hears of
 * registrations that own processes (EVF_FORK/EVF_CAPSULE) or listen to jobs:
 * hook(eid, is_job_listener, shutdown). */
static void unregister_slot_ex(EngineObject *self, uint32_t slot, int shutdown) {
    aem_reg *r = aem_slot(&self->core, slot);
    PyObject *handler = r->handler, *obj = r->obj;
    uint64_t eid = aem_eid_of(slot, r->gen);
    int internal = is_internal(r);
    int tell = !internal && ((r->flags & (AEM_F_FORK | AEM_F_CAPSULE)) || r->kind == AEM_K_JOB);
    int job_listener = r->kind == AEM_K_JOB;
    int fd = (r->kind >= AEM_K_READABLE && r->kind <= AEM_K_CLOSE) || r->kind == AEM_K_CUSTOM ? r->fd : -1;
    aem_engine_free_reg(&self->core, slot);
    if (self->failures && PyDict_GET_SIZE(self->failures)) forget_failures(self, eid);
    if (self->async_on && fd >= 0 && (uint32_t)fd < self->core.fdcap && !self->core.fds[fd].events)
        direct_kick(self, fd, 0);
    if (internal) self->internal--;
    if (tell && self->unregister_hook && self->unregister_hook != Py_None) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);  /* may run on an error path */
        PyObject *res = PyObject_CallFunction(self->unregister_hook, "Kii", (unsigned long long)eid,
                                              job_listener, shutdown);
        if (!res) PyErr_WriteUnraisable(self->unregister_hook);
        Py_XDECREF(res);
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(handler);
    Py_XDECREF(obj);
}

static void unregister_slot(EngineObject *self, uint32_t slot) { unregister_slot_ex(self, slot, 0); }

/* ---- Engine lifetime --------------------------------------------------------------- */

static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Engine() takes no arguments");
        return NULL;
    }
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    int rc = aem_engine_init(&self->core, &python_host);
    if (rc < 0) {
        Py_DECREF(self);
        return set_errno_error(rc, "aem engine");
    }
    self->owner_pid = getpid();
    return (PyObject *)self;
}

static void release_all(EngineObject *self) {
    aem_engine *e = &self->core;
    for (uint32_t s = 0; s < e->nslots; s++) {
        aem_reg *r = aem_slot(e, s);
        if (r->state == AEM_S_FREE) continue;
        PyObject *h = r->handler, *o = r->obj;
        r->handler = r->obj = NULL;
        Py_XDECREF(h);
        Py_XDECREF(o);
    }
}

/* Asynchronous mode, fast path for fds: the kernel itself signals the main thread
 * (O_ASYNC, F_SETOWN_EX to its tid, F_SETSIG to the kick signal) when data arrives
 * on a socket, pipe or tty, saving the hop through the doorbell thread — one
 * wake-up instead of two for a main thread blocked in a system call.  Files
 * without fasync support ignore it; the doorbell covers every source anyway. */
static void direct_kick(EngineObject *self, int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return;
    if (on) {
        struct f_owner_ex owner = {.type = F_OWNER_TID, .pid = self->main_tid};
        if (fcntl(fd, F_SETOWN_EX, &owner) < 0 || fcntl(fd, F_SETSIG, kick_signum) < 0) return;
        fcntl(fd, F_SETFL, fl | O_ASYNC);
    } else if (fl & O_ASYNC) {
        fcntl(fd, F_SETFL, fl & ~O_ASYNC);
    }
}

static void direct_kick_all(EngineObject *self, int on) {
    for (uint32_t fd = 0; fd < self->core.fdcap; fd++)
        if (self->core.fds[fd].events) direct_kick(self, (int)fd, on);
}

static void stop_async(EngineObject *self, int in_child) {
    if (!self->async_on) return;
    self->async_on = 0;
    if (!in_child) direct_kick_all(self, 0);
    if (!in_child) {
        Py_BEGIN_ALLOW_THREADS
        aem_doorbell_stop(&self->doorbell);
        Py_END_ALLOW_THREADS
    }
    if (async_engine == self) {
        async_engine = NULL;
        if (!in_child) Py_DECREF(self);
    }
}

static void engine_close_impl(EngineObject *self, int in_child) {
    if (self->closed) return;
    stop_async(self, in_child);
    self->closed = 1;
    release_all(self);
    aem_engine_destroy(&self->core);
    PyMem_Free(self->scratch);
    self->scratch = NULL;
    self->scratch_cap = 0;
}

static int engine_traverse(EngineObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->error_handler);
    Py_VISIT(self->spawn_hook);
    Py_VISIT(self->payload_hook);
    Py_VISIT(self->unregister_hook);
    Py_VISIT(self->failures);
    Py_VISIT(self->pool_hook);
    if (!self->closed) {
        aem_engine *e = &self->core;
        for (uint32_t s = 0; s < e->nslots; s++) {
            aem_reg *r = aem_slot(e, s);
            if (r->state == AEM_S_FREE) continue;
            Py_VISIT((PyObject *)r->handler);
            Py_VISIT((PyObject *)r->obj);
        }
    }
    return 0;
}

static int engine_clear(EngineObject *self) {
    Py_CLEAR(self->error_handler);
    Py_CLEAR(self->spawn_hook);
    Py_CLEAR(self->payload_hook);
    Py_CLEAR(self->unregister_hook);
    Py_CLEAR(self->failures);
    Py_CLEAR(self->pool_hook);
    if (!self->closed) release_all(self);
    return 0;
}

static void engine_dealloc(EngineObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    engine_close_impl(self, getpid() != self->owner_pid);
    engine_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *engine_close(EngineObject *self, PyObject *noargs) {
    if (self->running) {
        PyErr_SetString(AemError, "cannot close the engine while run() is in progress");
        return NULL;
    }
    engine_close_impl(self, 0);
    Py_RETURN_NONE;
}

static PyObject *engine_abandon(EngineObject *self, PyObject *noargs) {
    /* In a forked child: the doorbell thread does not exist here; drop everything. */
    self->running = 0;
    self->delivering = 0;
    engine_close_impl(self, 1);
    Py_RETURN_NONE;
}

/* ---- registration ------------------------------------------------------------------ */

/* Validate the common arguments; build the obj stored with the registration. */
static int prepare(EngineObject *self, PyObject *handler, unsigned long flags, PyObject *prio_obj,
                   PyObject *ctor, PyObject *dtor, PyObject *pool, PyObject *source, int32_t *prio,
                   PyObject **obj_out, uint16_t *flags_out) {
    if (!PyCallable_Check(handler)) {
        PyErr_Format(PyExc_TypeError, "handler must be callable, not %.100s", Py_TYPE(handler)->tp_name);
        return -1;
    }
    if (flags & ~(unsigned long)AEM_F__PUBLIC) {
        char bits[24];  /* PyErr_Format has no %lx before Python 3.12 */
        snprintf(bits, sizeof bits, "%#lx", flags & ~(unsigned long)AEM_F__PUBLIC);
        PyErr_Format(PyExc_ValueError, "unknown flag bits %s (known: EVF_ONESHOT, EVF_FORK, "
                     "EVF_NOCLDWAIT, EVF_CAPSULE, EVF_KEEPALIVE)", bits);
        return -1;
    }
    if ((flags & AEM_F_FORK) && (flags & AEM_F_CAPSULE)) {
        PyErr_SetString(PyExc_ValueError, "EVF_FORK and EVF_CAPSULE exclude each other");
        return -1;
    }
    if ((flags & (AEM_F_NOCLDWAIT | AEM_F_KEEPALIVE)) && !(flags & (AEM_F_FORK | AEM_F_CAPSULE))) {
        PyErr_SetString(PyExc_ValueError,
                        "EVF_NOCLDWAIT and EVF_KEEPALIVE apply to handlers run in their own process: "
                        "combine them with EVF_FORK or EVF_CAPSULE");
        return -1;
    }
    if ((flags & (AEM_F_FORK | AEM_F_CAPSULE)) && (!self->spawn_hook || self->spawn_hook == Py_None)) {
        PyErr_SetString(AemError, "EVF_FORK/EVF_CAPSULE need an aem.Engine (this bare core engine "
                        "has no process support)");
        return -1;
    }
    if (!PyLong_Check(prio_obj)) {
        PyErr_Format(PyExc_TypeError, "priority must be an int, not %.100s", Py_TYPE(prio_obj)->tp_name);
        return -1;
    }
    int overflow;
    long p = PyLong_AsLongAndOverflow(prio_obj, &overflow);
    if (overflow || p < INT32_MIN || p > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "priority must fit in 32 bits (-2**31 .. 2**31-1)");
        return -1;
    }
    *prio = (int32_t)p;
    if (ctor != Py_None && !PyCallable_Check(ctor)) {
        PyErr_SetString(PyExc_TypeError, "constructor must be callable or None");
        return -1;
    }
    if (dtor != Py_None && !PyCallable_Check(dtor)) {
        PyErr_SetString(PyExc_TypeError, "destructor must be callable or None");
        return -1;
    }
    if (pool != Py_None && !(flags & AEM_F_CAPSULE)) {
        PyErr_SetString(PyExc_ValueError, "pool= is only used with EVF_CAPSULE");
        return -1;
    }
    if (pool != Py_None && self->pool_hook && self->pool_hook != Py_None) {
        PyObject *ok = PyObject_CallOneArg(self->pool_hook, pool);
        if (!ok) return -1;
        Py_DECREF(ok);
    }
    *flags_out = (uint16_t)flags;
    if (ctor != Py_None || dtor != Py_None || pool != Py_None) {
        *obj_out = PyTuple_Pack(4, source ? source : Py_None, ctor, dtor, pool);
        if (!*obj_out) return -1;
        *flags_out |= AEM_F_EXTRAS;
    } else {
        *obj_out = Py_XNewRef(source);
    }
    return 0;
}

static PyObject *new_eid_result(EngineObject *self, uint32_t slot) {
    return PyLong_FromUnsignedLongLong(aem_eid_of(slot, aem_slot(&self->core, slot)->gen));
}

static PyObject *register_timer(EngineObject *self, PyObject *source, PyObject *handler,
                                uint16_t flags, int32_t prio, PyObject *obj) {
    int64_t after = ((AemTimerObject *)source)->after_ns;
    int64_t interval = ((AemTimerObject *)source)->interval_ns;
    /* The timer source object itself is not kept (event.source rebuilds it from
     * `after` and the interval): a timer costs its slot and its heap entry only.
     * A periodic timer whose first expiry differs from its interval keeps it. */
    int64_t arg = after;
    if (interval > 0) {
        flags |= AEM_F_PERIODIC;
        arg = interval;
        if (after == interval && !(flags & AEM_F_EXTRAS)) Py_CLEAR(obj);
    } else if (!(flags & AEM_F_EXTRAS)) {
        Py_CLEAR(obj);
    }
    int64_t slot = aem_engine_new_reg(&self->core, AEM_K_TIMER, flags, prio, handler, obj);
    if (slot < 0) {
        Py_XDECREF(obj);
        return PyErr_NoMemory();
    }
    Py_INCREF(handler);
    int rc = aem_engine_arm_timer(&self->core, (uint32_t)slot, aem_now_ns() + after, arg);
    if (rc < 0) {
        unregister_slot(self, (uint32_t)slot);
        return PyErr_NoMemory();
    }
    return new_eid_result(self, (uint32_t)slot);
}

static PyObject *engine_register(EngineObject *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    static const char *const names[] = {"source", "handler", "flags", "priority",
                                        "constructor", "destructor", "pool"};
    PyObject *vals[7] = {NULL, NULL, NULL, NULL, Py_None, Py_None, Py_None};
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 7) {
        PyErr_SetString(PyExc_TypeError, "register() takes at most 7 arguments");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) vals[i] = args[i];
    for (Py_ssize_t k = 0; k < nk; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int i = 0; i < 7; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                if (i < nargs) {
                    PyErr_Format(PyExc_TypeError, "register() got multiple values for '%s'", names[i]);
                    return NULL;
                }
                vals[i] = args[nargs + k];
                found = 1;
                break;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "register() got an unexpected keyword argument %R", key);
            return NULL;
        }
    }
    if (!vals[0] || !vals[1]) {
        PyErr_SetString(PyExc_TypeError, "register() needs a source and a handler");
        return NULL;
    }
    if (check_open(self) < 0) return NULL;
    PyObject *source = vals[0], *handler = vals[1];
    unsigned long flags = 0;
    if (vals[2]) {
        if (!PyLong_Check(vals[2])) {
            PyErr_Format(PyExc_TypeError, "flags must be an int, not %.100s", Py_TYPE(vals[2])->tp_name);
            return NULL;
        }
        flags = PyLong_AsUnsignedLong(vals[2]);
        if (flags == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "flags must be a combination of the EVF_* constants");
            return NULL;
        }
    }
    static PyObject *zero;
    if (!zero) zero = PyLong_FromLong(0);
    PyObject *prio_obj = vals[3] ? vals[3] : zero;
    int32_t prio;
    uint16_t f;
    PyObject *obj;
    if (prepare(self, handler, flags, prio_obj, vals[4], vals[5], vals[6], source, &prio, &obj, &f) < 0)
        return NULL;
    if (PyObject_TypeCheck(source, AemTimerBase_Type))
        return register_timer(self, source, handler, f, prio, obj);
    PyObject *attach = PyObject_GetAttr(source, aem_str_attach);
    if (!attach) {
        Py_XDECREF(obj);
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "expected an event source (aem.Timer, aem.Readable, aem.Read, aem.Signal, "
                         "aem.UserEvent, ... or an aem.Source subclass), got %.100s",
                         Py_TYPE(source)->tp_name);
        }
        return NULL;
    }
    PyObject *res = PyObject_CallFunction(attach, "OOHiO", (PyObject *)self, handler, f, prio,
                                          obj ? obj : Py_None);
    Py_DECREF(attach);
    Py_XDECREF(obj);
    return res;
}

/* _add_timer(after_seconds, handler) -> eid: an internal one-shot timer (not counted as a
 * registration of the application, e.g. the resumption of a paused Accept). */
static PyObject *engine_add_timer(EngineObject *self, PyObject *args) {
    PyObject *after_obj, *handler;
    if (!PyArg_ParseTuple(args, "OO:_add_timer", &after_obj, &handler)) return NULL;
    if (check_open(self) < 0) return NULL;
    int64_t after = aem_seconds_to_ns(after_obj, "after", 1);
    if (after < 0) return NULL;
    int64_t slot = aem_engine_new_reg(&self->core, AEM_K_TIMER, AEM_F_INTERNAL, 0, handler, NULL);
    if (slot < 0) return PyErr_NoMemory();
    Py_INCREF(handler);
    self->internal++;
    if (aem_engine_arm_timer(&self->core, (uint32_t)slot, aem_now_ns() + after, after) < 0) {
        unregister_slot(self, (uint32_t)slot);
        return PyErr_NoMemory();
    }
    return new_eid_result(self, (uint32_t)slot);
}

/* _add(kind, target, events, handler, flags, priority, obj, data=0, internal=False) -> eid
 * data: kind data kept in the high 32 bits of arg (Read: max size; ChildExit: pid).
 * The low-level registration used by the sources' _attach (arguments already checked). */
static PyObject *engine_add(EngineObject *self, PyObject *args) {
    int kind, internal = 0;
    PyObject *target, *handler, *obj;
    unsigned int events;
    unsigned short flags;
    int prio;
    long long aux = 0;
    if (!PyArg_ParseTuple(args, "iOIOHiO|Lp:_add", &kind, &target, &events, &handler, &flags, &prio,
                          &obj, &aux, &internal))
        return NULL;
    if (check_open(self) < 0) return NULL;
    if (kind <= AEM_K_NONE || kind >= AEM_K__COUNT || kind == AEM_K_TIMER) {
        PyErr_Format(PyExc_ValueError, "bad event kind %d", kind);
        return NULL;
    }
    if (obj == Py_None) obj = NULL;
    if (internal) flags |= AEM_F_INTERNAL;
    if (kind == AEM_K_CHILD && (aux >> 32)) flags |= AEM_F_NOREAP;  /* data: pid | no_reap << 32 */
    int64_t slot = aem_engine_new_reg(&self->core, (uint8_t)kind, flags, prio, handler, obj);
    if (slot < 0) return PyErr_NoMemory();
    Py_INCREF(handler);
    Py_XINCREF(obj);
    if (internal) self->internal++;
    aem_slot(&self->core, (uint32_t)slot)->arg = (int64_t)((uint64_t)(uint32_t)aux << 32);
    int rc = 0;
    const char *what = "register";
    switch (kind) {
    case AEM_K_READABLE: case AEM_K_WRITABLE: case AEM_K_ACCEPT: case AEM_K_READ: case AEM_K_CLOSE:
    case AEM_K_CUSTOM: {
        int fd = PyObject_AsFileDescriptor(target);
        if (fd < 0) goto fail;
        if (aem_engine_owns_fd(&self->core, fd)) {
            PyErr_Format(PyExc_ValueError, "fd %d is one of aem's own descriptors (its epoll, timer or "
                         "wake-up fd): the file or socket that had this number was closed", fd);
            goto fail;
        }
        rc = aem_engine_arm_fd(&self->core, (uint32_t)slot, fd, events);
        if (rc == -EINVAL) {
            PyErr_Format(PyExc_ValueError, "fd %d cannot be watched by epoll (an epoll fd itself, or a "
                         "number whose file was closed and reused?)", fd);
            goto fail;
        }
        if (rc == -EPERM) {
            PyErr_Format(PyExc_ValueError, "fd %d cannot be watched by epoll (a regular file or "
                         "directory is always ready; read it directly)", fd);
            goto fail;
        }
        if (rc == -EBADF) {
            PyErr_Format(PyExc_ValueError, "fd %d is not an open file descriptor", fd);
            goto fail;
        }
        if (rc == 0 && self->async_on) direct_kick(self, fd, 1);
        what = "epoll_ctl";
        break;
    }
    case AEM_K_CHILD: case AEM_K_PRESSURE: {
        int fd = PyObject_AsFileDescriptor(target);
        if (fd < 0) goto fail;
        rc = aem_engine_arm_owned_fd(&self->core, (uint32_t)slot, fd, events);
        what = "epoll_ctl";
        break;
    }
    case AEM_K_SIGNAL: {
        long sig = PyLong_AsLong(target);
        if (sig == -1 && PyErr_Occurred()) goto fail;
        rc = aem_engine_arm_signal(&self->core, (uint32_t)slot, (int)sig);
        if (rc == -EBUSY) {
            PyErr_Format(AemError, "signal %ld is already routed to another aem engine", sig);
            goto fail;
        }
        if (rc == -EINVAL) {
            PyErr_Format(PyExc_ValueError, "signal %ld cannot be caught", sig);
            goto fail;
        }
        what = "sigaction";
        break;
    }
    case AEM_K_FILE: {
        PyObject *bytes;
        if (!PyUnicode_FSConverter(target, &bytes)) goto fail;
        rc = aem_engine_arm_inotify(&self->core, (uint32_t)slot, PyBytes_AS_STRING(bytes), events);
        if (rc < 0) {
            errno = -rc;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, target);
            Py_DECREF(bytes);
            goto fail;
        }
        Py_DECREF(bytes);
        break;
    }
    default:
        rc = aem_engine_arm_hosted(&self->core, (uint32_t)slot);
    }
    if (rc < 0) {
        set_errno_error(rc, what);
        goto fail;
    }
    return new_eid_result(self, (uint32_t)slot);
fail:
    unregister_slot(self, (uint32_t)slot);
    return NULL;
}

static PyObject *engine_unregister(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"eid", "missing_ok", NULL};
    PyObject *eid_obj;
    int missing_ok = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:unregister", kwlist, &eid_obj, &missing_ok))
        return NULL;
    if (check_open(self) < 0) return NULL;
    uint64_t eid;
    uint32_t slot;
    aem_reg *r = lookup_or_raise(self, eid_obj, &eid, &slot);
    if (!r || is_internal(r)) {
        if (r) PyErr_Format(AemUnknownEvent, "no registered event with id %R", eid_obj);
        if (missing_ok && PyErr_ExceptionMatches(AemUnknownEvent)) {
            PyErr_Clear();
            Py_RETURN_FALSE;
        }
        return NULL;
    }
    unregister_slot(self, slot);
    Py_RETURN_TRUE;
}

static PyObject *engine_control(EngineObject *self, PyObject *args) {
    PyObject *eid_obj, *arg = Py_None;
    int op;
    if (!PyArg_ParseTuple(args, "Oi|O:control", &eid_obj, &op, &arg)) return NULL;
    if (check_open(self) < 0) return NULL;
    if (op != AEM_EVJOBPRIO && op != AEM_EVJOBSTOP && op != AEM_EVJOBSTART && op != AEM_EVJOBSHTDN) {
        PyErr_Format(PyExc_ValueError, "unknown control operation %d (EVJOBPRIO, EVJOBSTOP, "
                     "EVJOBSTART, EVJOBSHTDN, EVTBLINIT)", op);
        return NULL;
    }
    uint64_t eid;
    uint32_t slot;
    aem_reg *r = lookup_or_raise(self, eid_obj, &eid, &slot);
    if (!r) return NULL;
    if (is_internal(r)) {
        PyErr_Format(AemUnknownEvent, "no registered event with id %R", eid_obj);
        return NULL;
    }
    int rc = 0;
    switch (op) {
    case AEM_EVJOBPRIO: {
        if (!PyLong_Check(arg)) {
            PyErr_SetString(PyExc_TypeError, "EVJOBPRIO needs the new priority (an int) as arg");
            return NULL;
        }
        int overflow;
        long p = PyLong_AsLongAndOverflow(arg, &overflow);
        if (overflow || p < INT32_MIN || p > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "priority must fit in 32 bits");
            return NULL;
        }
        aem_engine_set_priority(&self->core, slot, (int32_t)p);
        break;
    }
    case AEM_EVJOBSTOP:
        rc = aem_engine_stop_reg(&self->core, slot);
        break;
    case AEM_EVJOBSTART:
        rc = aem_engine_start_reg(&self->core, slot);
        if (rc == 0 && self->core.pqlen) aem_engine_wake(&self->core);
        break;
    case AEM_EVJOBSHTDN:
        unregister_slot_ex(self, slot, 1);  /* the unregister hook ends the job's processes */
        break;
    }
    if (rc == -EINVAL) {
        PyErr_Format(AemError, "event %R has finished; it cannot be stopped or started", eid_obj);
        return NULL;
    }
    if (rc < 0) return set_errno_error(rc, "control");
    Py_RETURN_NONE;
}

/* ---- delivery ---------------------------------------------------------------------- */

/* An exception is set: decide.  Returns 0 when handled (an Exception: counted,
 * given to the error handler), -1 when it must propagate (a BaseException). */
static int report(EngineObject *self, PyObject *event) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    self->core.stats.errors++;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb) PyException_SetTraceback(value, tb);
    if (self->error_handler && self->error_handler != Py_None) {
        PyObject *res = PyObject_CallFunctionObjArgs(self->error_handler, value,
                                                     event ? event : Py_None, NULL);
        if (!res) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(tb);
                return -1;
            }
            PyErr_WriteUnraisable(self->error_handler);
        }
        Py_XDECREF(res);
    } else {
        PyErr_Restore(type, value, tb);
        PyErr_Print();
        return 0;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return 0;
}

/* Engine-side failures (not the handler's): a source's collect() raised, accept() failed.
 * Each pauses the registration for AEM_BACKOFF_FIRST_S seconds, doubled at each consecutive
 * failure; the AEM_FAILURES_MAX-th unregisters it.  Nothing spins. */
#define AEM_FAILURES_MAX 5
#define AEM_BACKOFF_FIRST_S 0.01
#define AEM_ACCEPT_PAUSE_S 0.1  /* accept() out of descriptors or memory */
#define AEM_ACCEPT_BATCH 64     /* connections accepted per readiness of a listener */
#define AEM_DRAIN_TURNS 64      /* turns of one asynchronous drain (then the doorbell again) */

/* Pause registration eid for `pause` seconds (Engine._backoff: EVJOBSTOP, then EVJOBSTART
 * from an internal timer), if it is still active. */
static int backoff(EngineObject *self, uint64_t eid, double pause) {
    uint32_t slot;
    aem_reg *r = aem_engine_lookup(&self->core, eid, &slot);
    if (!r || r->state != AEM_S_ACTIVE) return 0;
    PyObject *res = PyObject_CallMethod((PyObject *)self, "_backoff", "Kd", (unsigned long long)eid, pause);
    if (!res) return -1;
    Py_DECREF(res);
    return 0;
}

typedef struct {
    PyObject *handler, *source, *ctor, *dtor, *pool;
    uint64_t eid;
    uint16_t flags;
    int32_t priority;
} target_t;

/* The exception set, normalised, with its traceback (PyErr_GetRaisedException of 3.12). */
static PyObject *fetch_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* An exception is set by the engine's own work for registration t.  An Exception is
 * counted and the registration backs off; at the AEM_FAILURES_MAX-th in a row it is
 * unregistered and the error handler gets one AemError naming it (eid, source, the last
 * exception as its __cause__).  Returns 0, or -1 when a BaseException must propagate. */
static int source_failed(EngineObject *self, const target_t *t) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    self->core.stats.errors++;
    PyObject *exc = fetch_exception();
    PyObject *key = PyLong_FromUnsignedLongLong(t->eid);
    if (!key) goto fail;
    if (!self->failures && !(self->failures = PyDict_New())) goto fail;
    PyObject *prev = PyDict_GetItemWithError(self->failures, key);
    if (!prev && PyErr_Occurred()) goto fail;
    long n = (prev ? PyLong_AsLong(prev) : 0) + 1;
    if (n < AEM_FAILURES_MAX) {
        PyObject *count = PyLong_FromLong(n);
        if (!count || PyDict_SetItem(self->failures, key, count) < 0) {
            Py_XDECREF(count);
            goto fail;
        }
        Py_DECREF(count);
        Py_DECREF(key);
        Py_DECREF(exc);
        if (backoff(self, t->eid, AEM_BACKOFF_FIRST_S * (double)(1L << (n - 1))) < 0)
            return report(self, NULL);
        return 0;
    }
    Py_DECREF(key);
    forget_failures(self, t->eid);
    uint32_t slot;
    if (aem_engine_lookup(&self->core, t->eid, &slot)) unregister_slot(self, slot);
    PyErr_Format(AemError, "event %llu (%R) failed %ld times in a row and was unregistered: %R",
                 (unsigned long long)t->eid, t->source ? t->source : Py_None, n, exc);
    PyObject *err = fetch_exception();
    PyException_SetCause(err, exc);  /* steals exc */
    PyErr_SetObject((PyObject *)Py_TYPE(err), err);
    Py_DECREF(err);
    self->core.stats.errors--;  /* report() counts it */
    return report(self, NULL);
fail:
    Py_XDECREF(key);
    Py_DECREF(exc);
    return report(self, NULL);
}

static void default_destructor(EngineObject *self, EventObject *ev) {
    /* Payloads in vmtable blocks go back unless the handler kept them (event.keep()).
     * A block the handler freed or detached itself is left alone; one still viewed
     * by a memoryview is freed when the last view goes. */
    if (ev->kept || ev->kind != AEM_K_READ || !ev->o[0] || PyBytes_CheckExact(ev->o[0])) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);  /* a KeyboardInterrupt of the handler must survive */
    if (aem_block_release(ev->o[0]) < 0) PyErr_WriteUnraisable(ev->o[0]);
    PyErr_Restore(type, value, tb);
}

/* Run constructor, handler (or spawn hook), destructor.  -1: a BaseException propagates. */
static int call_handler(EngineObject *self, const target_t *t, EventObject *ev) {
    PyObject *event = (PyObject *)ev, *res;
    int rc = 0;
    int was_delivering = self->delivering;  /* synchronous deliveries (_deliver_now) nest */
    self->delivering = 1;
    if (t->ctor && t->ctor != Py_None) {
        res = PyObject_Vectorcall(t->ctor, &event, 1, NULL);
        if (!res) {
            rc = report(self, event);
            goto destruct;
        }
        Py_DECREF(res);
    }
    int sent = (t->flags & AEM_F_CAPSULE) ? aem_handoff_deliver(t->pool, t->eid, t->flags, t->priority, ev) : 0;
    if (sent) {  /* handed to an idle capsule from C (1), or an error (-1) */
        res = sent > 0 ? Py_NewRef(Py_None) : NULL;
    } else if (t->flags & (AEM_F_FORK | AEM_F_CAPSULE)) {
        res = PyObject_CallFunction(self->spawn_hook, "KOOHOi", (unsigned long long)t->eid, t->handler,
                                    event, (unsigned short)(t->flags & AEM_F__PUBLIC),
                                    t->pool ? t->pool : Py_None, (int)t->priority);
    } else {
        res = PyObject_Vectorcall(t->handler, &event, 1, NULL);
    }
    if (!res) rc = report(self, event);
    Py_XDECREF(res);
destruct:
    if (t->dtor && t->dtor != Py_None) {
        PyObject *type = NULL, *value = NULL, *tb = NULL;
        if (rc < 0) PyErr_Fetch(&type, &value, &tb);
        res = PyObject_Vectorcall(t->dtor, &event, 1, NULL);
        if (!res && report(self, event) < 0 && rc == 0) rc = -1;
        else if (!res) PyErr_Clear();
        Py_XDECREF(res);
        if (type || value) {
            if (PyErr_Occurred()) PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
    } else {
        default_destructor(self, ev);
    }
    self->delivering = was_delivering;
    self->core.stats.delivered[ev->kind]++;
    return rc;
}

static int ensure_scratch(EngineObject *self, size_t n) {
    if (self->scratch_cap >= n) return 0;
    char *p = PyMem_Realloc(self->scratch, n);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    self->scratch = p;
    self->scratch_cap = n;
    return 0;
}

/* The payload of a Read: a block of the engine's payload vmtable (the process
 * vmtable, set when the first Read is registered) holding a copy of the bytes
 * read, or bytes when there is none. */
static PyObject *make_payload(EngineObject *self, const char *data, Py_ssize_t n) {
    if (n > 0 && self->payload_hook && aem_vmtable_check_type(self->payload_hook))
        return aem_vmtable_copy_in(self->payload_hook, data, (size_t)n);
    return PyBytes_FromStringAndSize(data, n);
}

static PyObject *sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len) {
    if (ss->ss_family == AF_INET || ss->ss_family == AF_INET6) {
        char host[64];
        if (ss->ss_family == AF_INET) {
            const struct sockaddr_in *a = (const void *)ss;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
            return Py_BuildValue("(si)", host, ntohs(a->sin_port));
        }
        const struct sockaddr_in6 *a = (const void *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo), a->sin6_scope_id);
    }
    if (ss->ss_family == AF_UNIX) {
        const struct sockaddr_un *a = (const void *)ss;
        Py_ssize_t n = (Py_ssize_t)len - (Py_ssize_t)offsetof(struct sockaddr_un, sun_path);
        if (n <= 0) return PyUnicode_FromString("");
        if (a->sun_path[0] == 0) return PyBytes_FromStringAndSize(a->sun_path, n);
        return PyUnicode_DecodeFSDefault(a->sun_path);
    }
    Py_RETURN_NONE;
}

static int deliver_accept(EngineObject *self, const target_t *t, const aem_occ *o, int fd) {
    PyObject *sockargs = t->source ? PyObject_GetAttr(t->source, aem_str_sockargs) : NULL;
    if (!sockargs) {
        PyErr_Clear();
        return 0;
    }
    int rc = 0;
    for (int i = 0; i < AEM_ACCEPT_BATCH; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int conn = accept4(fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            int err = errno;
            PyErr_SetFromErrno(PyExc_OSError);
            if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
                /* Out of descriptors or memory, for a while: the connection stays in the
                 * backlog and the socket readable.  Report, pause this Accept, never give up. */
                rc = report(self, NULL);
                if (rc == 0 && backoff(self, t->eid, AEM_ACCEPT_PAUSE_S) < 0) rc = report(self, NULL);
            } else {
                rc = source_failed(self, t);  /* e.g. EINVAL: the socket stopped listening */
            }
            break;
        }
        source_ok(self, t->eid);
        /* The connection becomes a socket.socket (which then owns the fd). */
        PyObject *family = PyTuple_GET_ITEM(sockargs, 0), *type = PyTuple_GET_ITEM(sockargs, 1);
        PyObject *proto = PyTuple_GET_ITEM(sockargs, 2);
        PyObject *fdobj = PyLong_FromLong(conn);
        PyObject *sock = fdobj ? PyObject_CallFunctionObjArgs(aem_socket_type, family, type, proto, fdobj,
                                                              NULL) : NULL;
        Py_XDECREF(fdobj);
        EventObject *ev = sock ? aem_event_new(AEM_K_ACCEPT, t->eid, o->time_ns, t->source) : NULL;
        PyObject *addr = ev ? sockaddr_to_py(&ss, len) : NULL;
        if (!addr) {
            if (!sock) close(conn);
            Py_XDECREF(sock);  /* closes conn */
            Py_XDECREF(ev);
            rc = report(self, NULL);  /* an Exception goes to the error handler; the loop goes on */
            break;
        }
        ev->o[0] = sock;
        ev->o[1] = addr;
        ev->b = (uint64_t)conn;
        rc = call_handler(self, t, ev);
        Py_DECREF(ev);
        if (rc < 0) break;
        uint32_t slot;
        aem_reg *r = aem_engine_lookup(&self->core, t->eid, &slot);
        if (!r || r->state != AEM_S_ACTIVE) break;  /* unregistered or stopped by the handler */
    }
    Py_DECREF(sockargs);
    return rc;
}

static int deliver_read(EngineObject *self, const target_t *t, const aem_occ *o, int fd, int64_t arg,
                        int *eof) {
    size_t max = (arg >> 32) > 0 ? (size_t)(arg >> 32) : 65536;
    if (ensure_scratch(self, max) < 0) return -1;
    ssize_t n;
    do {
        n = recv(fd, self->scratch, max, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;  /* spurious */
    if (n < 0 && errno == ENOTSOCK) {
        do {
            n = read(fd, self->scratch, max);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EAGAIN) return 0;
    }
    /* The bytes leave the scratch buffer before any Python code runs (a nested
     * delivery would reuse it). */
    PyObject *data;
    if (n > 0 && aem_http_hook_type && Py_IS_TYPE(t->handler, aem_http_hook_type) &&
        !(t->flags & (AEM_F_EXTRAS | AEM_F_FORK | AEM_F_CAPSULE))) {
        /* AEMhttpd's connection: its fast path answers what it can first (http_hook.c) */
        int was_delivering = self->delivering;
        self->delivering = 1;
        int hr = aem_http_read_hook(t->handler, fd, self->scratch, (size_t)n, o->time_ns, &data);
        self->delivering = was_delivering;
        if (hr < 0) return report(self, NULL);
        source_ok(self, t->eid);
        if (hr > 0) {
            self->core.stats.delivered[AEM_K_READ]++;
            return 0;
        }
    } else {
        data = n > 0 ? make_payload(self, self->scratch, n) : PyBytes_FromStringAndSize(NULL, 0);
        if (!data) return source_failed(self, t);  /* e.g. the process vmtable cannot hold it */
        source_ok(self, t->eid);
    }
    EventObject *ev = aem_event_new(AEM_K_READ, t->eid, o->time_ns, t->source);
    if (!ev) {
        Py_DECREF(data);
        return -1;
    }
    ev->b = (uint64_t)fd;
    ev->o[0] = data;
    if (n <= 0) {  /* end of stream (or an error: aem.Close reports it) */
        ev->a = 1;
        *eof = 1;
    }
    int rc = call_handler(self, t, ev);
    Py_DECREF(ev);
    return rc;
}

static int fill_child(EngineObject *self, EventObject *ev, int pidfd, int64_t arg, uint16_t flags) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    int options = WEXITED | WNOHANG | ((flags & AEM_F_NOREAP) ? WNOWAIT : 0);
    ev->o[0] = PyLong_FromLongLong(arg >> 32);
    if (waitid(P_PIDFD, (id_t)pidfd, &info, options) == 0 && info.si_pid != 0) {
        int code = info.si_code == CLD_EXITED ? info.si_status : -info.si_status;
        ev->o[1] = PyLong_FromLong(code);
    } else {
        ev->o[1] = Py_NewRef(Py_None);  /* not our child, or already reaped elsewhere */
    }
    return ev->o[0] && ev->o[1] ? 0 : -1;
}

static int deliver_custom(EngineObject *self, const target_t *t, const aem_occ *o) {
    PyObject *items = PyObject_CallMethod(t->source, "collect", "K", (unsigned long long)o->a);
    if (!items) return source_failed(self, t);
    if (items == Py_None) {
        Py_DECREF(items);
        source_ok(self, t->eid);
        return 0;
    }
    PyObject *it = PyObject_GetIter(items);
    Py_DECREF(items);
    if (!it) return source_failed(self, t);
    int rc = 0;
    PyObject *item;
    while ((item = PyIter_Next(it))) {
        EventObject *ev = aem_event_new(AEM_K_CUSTOM, t->eid, o->time_ns, t->source);
        if (!ev) {
            Py_DECREF(item);
            rc = -1;
            break;
        }
        ev->a = o->a;
        ev->o[0] = item;
        rc = call_handler(self, t, ev);
        Py_DECREF(ev);
        if (rc < 0) break;
    }
    Py_DECREF(it);
    if (rc == 0 && PyErr_Occurred()) return source_failed(self, t);  /* the iteration raised */
    if (rc == 0) source_ok(self, t->eid);
    return rc;
}

/* What delivering to registration r needs (borrowed references). */
static target_t target_of(const aem_reg *r, uint64_t eid, int32_t priority) {
    target_t t = {.handler = r->handler, .eid = eid, .flags = r->flags, .priority = priority};
    PyObject *obj = r->obj;
    if (t.flags & AEM_F_EXTRAS) {  /* (source, constructor, destructor, pool) */
        t.source = PyTuple_GET_ITEM(obj, 0);
        t.ctor = PyTuple_GET_ITEM(obj, 1);
        t.dtor = PyTuple_GET_ITEM(obj, 2);
        t.pool = PyTuple_GET_ITEM(obj, 3);
        if (t.source == Py_None) t.source = NULL;
    } else {
        t.source = obj;
    }
    return t;
}

/* Unregister the registration of t (if it still exists: Python code may have run). */
static void finish(EngineObject *self, const target_t *t) {
    uint32_t slot;
    if (aem_engine_lookup(&self->core, t->eid, &slot)) unregister_slot(self, slot);
}

static int deliver_one(EngineObject *self, aem_occ *o) {
    aem_engine *e = &self->core;
    aem_reg *r = aem_slot(e, o->slot);
    target_t t = target_of(r, aem_eid_of(o->slot, o->gen), o->priority);
    PyObject *obj = r->obj;
    /* Everything needed of the registration, read now: any Python code below (even an
     * allocation that runs the garbage collector) may unregister it or reuse its slot. */
    uint8_t kind = r->kind;
    int fd = r->fd;
    int64_t arg = r->arg;
    int finished = kind == AEM_K_CLOSE || kind == AEM_K_CHILD || (t.flags & AEM_F_ONESHOT) ||
                   (kind == AEM_K_TIMER && !(t.flags & AEM_F_PERIODIC));
    /* Our own references: the handler may unregister itself. */
    Py_INCREF(t.handler);
    Py_XINCREF(obj);
    int rc = 0;
    EventObject *ev = NULL;
    switch (kind) {
    case AEM_K_ACCEPT:
        if (finished) finish(self, &t);
        rc = deliver_accept(self, &t, o, fd);
        goto done;
    case AEM_K_READ: {
        int eof = 0;
        rc = deliver_read(self, &t, o, fd, arg, &eof);
        if (finished || eof) finish(self, &t);  /* no Read event follows the end of the stream */
        goto done;
    }
    case AEM_K_CUSTOM:
        if (finished) finish(self, &t);
        rc = deliver_custom(self, &t, o);
        goto done;
    default:
        break;
    }
    if ((kind == AEM_K_READABLE || kind == AEM_K_WRITABLE) && aem_loop_is_waker(t.handler) &&
        !(t.flags & (AEM_F_FORK | AEM_F_CAPSULE)) && (!t.ctor || t.ctor == Py_None) &&
        (!t.dtor || t.dtor == Py_None)) {  /* aem.EventLoop's fd readiness: no Event object */
        if (finished) finish(self, &t);
        int was_delivering = self->delivering;
        self->delivering = 1;
        rc = aem_loop_wake(t.handler);
        if (rc < 0) rc = report(self, NULL);
        self->delivering = was_delivering;
        self->core.stats.delivered[kind]++;
        goto done;
    }
    ev = aem_event_new(kind, t.eid, o->time_ns, t.source);
    if (!ev) {
        rc = -1;
        goto done;
    }
    ev->a = o->a;
    ev->b = o->b;
    switch (kind) {
    case AEM_K_TIMER:
        if (t.flags & AEM_F_PERIODIC) {
            ev->t_interval = arg;
            ev->t_after = arg;  /* when it differed, the source object was kept */
        } else {
            ev->t_after = arg;
        }
        break;
    case AEM_K_READABLE: case AEM_K_WRITABLE:
        ev->b = (uint64_t)fd;
        break;
    case AEM_K_CLOSE: {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = 0;
        ev->a = (uint64_t)err;
        ev->b = (uint64_t)fd;
        break;
    }
    case AEM_K_CHILD:
        rc = fill_child(self, ev, fd, arg, t.flags);
        break;
    case AEM_K_JOB: case AEM_K_HOSTED:
        if (o->obj && PyTuple_Check(o->obj)) {
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o->obj) && i < 4; i++)
                ev->o[i] = Py_NewRef(PyTuple_GET_ITEM(o->obj, i));
        }
        Py_CLEAR(o->obj);
        break;
    case AEM_K_FILE: case AEM_K_USER:
        ev->o[0] = o->obj;  /* ownership moves to the event */
        o->obj = NULL;
        break;
    case AEM_K_PRESSURE:
        ev->o[0] = t.source ? PyObject_GetAttrString(t.source, "kind") : NULL;
        if (!ev->o[0]) PyErr_Clear();
        break;
    }
    if (finished) finish(self, &t);
    if (rc == 0) rc = call_handler(self, &t, ev);
done:
    Py_XDECREF(o->obj);
    o->obj = NULL;
    Py_XDECREF(ev);
    Py_DECREF(t.handler);
    Py_XDECREF(obj);
    return rc;
}

static int engine_step_inner(EngineObject *self, int timeout_ms);

/* One turn: wait up to timeout_ms, collect, deliver what was pending.
 * Returns the number of occurrences delivered, or -1 with an exception set. */
static int engine_step(EngineObject *self, int timeout_ms) {
    self->in_step = 1;
    int rc = engine_step_inner(self, timeout_ms);
    self->in_step = 0;
    return rc;
}

static int engine_step_inner(EngineObject *self, int timeout_ms) {
    aem_engine *e = &self->core;
    self->deliver_thread = PyThread_get_thread_ident();
    if (self->async_on) {  /* events the doorbell's wait consumed (PSI triggers) */
        struct epoll_event handed[AEM_DOORBELL_HANDOVER];
        int k = aem_doorbell_take(&self->doorbell, handed, AEM_DOORBELL_HANDOVER);
        if (k > 0) aem_engine_collect(e, handed, k);
    }
    if (e->pqlen) timeout_ms = 0;
    int n = 0;
    /* Busy (the last turn delivered something): more is likely ready; look without
     * giving the GIL away, which costs more than the look itself. */
    if (timeout_ms == 0 || self->busy) n = aem_engine_wait(e->epfd, e->evbuf, AEM_MAXEVENTS, 0);
    if (n == 0 && timeout_ms != 0) {
        Py_BEGIN_ALLOW_THREADS
        n = aem_engine_wait(e->epfd, e->evbuf, AEM_MAXEVENTS, timeout_ms);
        Py_END_ALLOW_THREADS
    }
    if (n == -EINTR) {
        if (PyErr_CheckSignals() < 0) {
            self->wait_interrupted = 1;
            return -1;
        }
        n = 0;
    } else if (n < 0) {
        set_errno_error(n, "epoll_wait");
        return -1;
    }
    if (n > 0) aem_engine_collect(e, e->evbuf, n);
    uint32_t budget = e->pqlen;
    int delivered = 0;
    aem_occ o;
    while (budget-- && !self->closed && aem_engine_pop(e, &o)) {
        delivered++;
        if (deliver_one(self, &o) < 0) return -1;
        if (self->stop_requested) break;
    }
    self->busy = delivered > 0;
    return delivered;
}

static PyObject *engine_run(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"timeout", "until_idle", NULL};
    PyObject *timeout_obj = Py_None;
    int until_idle = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|Op:run", kwlist, &timeout_obj, &until_idle)) return NULL;
    if (check_open(self) < 0) return NULL;
    if (self->running) {
        PyErr_SetString(AemError, self->delivering ? "aem.run() called from a handler: handlers never nest"
                                                   : "aem.run() is already running in another thread");
        return NULL;
    }
    if (self->delivering) {
        PyErr_SetString(AemError, "aem.run() called from a handler: handlers never nest");
        return NULL;
    }
    int64_t deadline = -1;
    if (timeout_obj != Py_None) {
        int64_t t = aem_seconds_to_ns(timeout_obj, "timeout", 1);
        if (t < 0) return NULL;
        deadline = aem_now_ns() + t;
    }
    if (self->async_on && !pthread_equal(pthread_self(), self->main_thread)) {
        PyErr_SetString(AemError, "the engine delivers asynchronously to the main thread: call "
                        "aem.run() from the main thread, or aem.stop() first");
        return NULL;
    }
    self->running = 1;
    self->stop_requested = 0;
    self->run_thread = PyThread_get_thread_ident();
    if (self->async_on) aem_doorbell_pause(&self->doorbell, 1);
    const char *reason = NULL;
    PyObject *result = NULL;
    int stepped = 0;
    for (;;) {
        if (self->stop_requested) { reason = "stopped"; break; }
        if (self->closed) { reason = "closed"; break; }
        if (until_idle && user_live(self) == 0 && self->core.pqlen == 0) { reason = "idle"; break; }
        int timeout_ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - aem_now_ns();
            if (left <= 0 && stepped) { reason = "timeout"; break; }
            int64_t ms = (left + 999999) / 1000000;
            timeout_ms = left <= 0 ? 0 : (int)(ms > INT32_MAX ? INT32_MAX : ms);  /* run(0): one poll */
        }
        self->wait_interrupted = 0;
        if (engine_step(self, timeout_ms) < 0) {
            /* Ctrl-C while waiting ends run(); a KeyboardInterrupt from a handler propagates. */
            if (self->wait_interrupted && PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                PyErr_Clear();
                reason = "interrupted";
            }
            break;
        }
        stepped = 1;
    }
    self->running = 0;
    self->stop_requested = 0;
    if (self->async_on) aem_doorbell_pause(&self->doorbell, 0);
    if (reason) result = PyUnicode_FromString(reason);
    return result;
}

/* ---- hooks for the asyncio loop (loop*.c, aem.loop) ------------------------------------ */

/* One turn for an asyncio loop: wait up to timeout_ms (<0: forever), deliver what is ready.
 * Returns the number of occurrences delivered, or -1 with an exception set. */
int aem_py_engine_turn(EngineObject *self, int timeout_ms) {
    if (check_open(self) < 0) return -1;
    if (self->running || self->delivering) {
        PyErr_SetString(AemError, "the aem engine is already delivering (aem.run() or a handler): "
                        "an asyncio loop on it cannot run now");
        return -1;
    }
    if (self->async_on && !pthread_equal(pthread_self(), self->main_thread)) {
        PyErr_SetString(AemError, "the engine delivers asynchronously to the main thread: run the "
                        "asyncio loop in the main thread, or aem.stop() first");
        return -1;
    }
    self->running = 1;
    self->stop_requested = 0;
    self->run_thread = PyThread_get_thread_ident();
    if (self->async_on) aem_doorbell_pause(&self->doorbell, 1);
    int n = engine_step(self, timeout_ms);
    self->running = 0;
    self->stop_requested = 0;
    if (self->async_on) aem_doorbell_pause(&self->doorbell, 0);
    return n;
}

/* Unregister eid, internal registrations included. Returns 1, or 0 when it is gone. */
int aem_py_engine_remove(EngineObject *self, uint64_t eid) {
    uint32_t slot;
    if (self->closed || !aem_engine_lookup(&self->core, eid, &slot)) return 0;
    unregister_slot(self, slot);
    return 1;
}

static PyObject *engine_turn(EngineObject *self, PyObject *arg) {
    long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) return NULL;
    int n = aem_py_engine_turn(self, t > INT32_MAX ? INT32_MAX : t < 0 ? -1 : (int)t);
    return n < 0 ? NULL : PyLong_FromLong(n);
}

static PyObject *engine_remove(EngineObject *self, PyObject *arg) {
    uint64_t eid = PyLong_AsUnsignedLongLong(arg);
    if (eid == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(aem_py_engine_remove(self, eid));
}

static PyObject *engine_stop(EngineObject *self, PyObject *noargs) {
    if (self->running) {
        self->stop_requested = 1;
        if (!self->closed) aem_engine_wake(&self->core);
    }
    stop_async(self, 0);
    Py_RETURN_NONE;
}

/* ---- asynchronous delivery -------------------------------------------------------------- */

/* Deliver everything ready, in the main thread (pending call or kick signal handler). */
static int drain(EngineObject *self) {
    if (self->delivering || self->in_step || self->running || self->closed) {
        /* Not now (a handler or a turn is in progress: handlers never nest).  Whoever
         * is delivering acknowledges the doorbell when it is done. */
        self->nested++;
        self->ring_owed = 1;
        return 0;
    }
    self->drains++;
    int rc = 0;
    for (int i = 0; i < AEM_DRAIN_TURNS; i++) {
        int n = engine_step(self, 0);
        if (n < 0) {
            rc = -1;
            break;
        }
        if (n == 0 && self->core.pqlen == 0) break;
    }
    /* Occurrences still queued (the budget ran out, or a BaseException stopped us):
     * make the epoll fd readable so that the doorbell rings again. */
    if (self->core.pqlen) aem_engine_wake(&self->core);
    self->ring_owed = 0;
    if (self->async_on) aem_doorbell_ack(&self->doorbell);
    return rc;
}

/* After a delivery outside any drain or turn (a synchronous _deliver_now): a ring
 * that came meanwhile was declined; acknowledge it now so the doorbell rings again. */
static void settle_owed_ring(EngineObject *self) {
    if (self->ring_owed && !self->delivering && !self->in_step && !self->running && self->async_on) {
        self->ring_owed = 0;
        aem_doorbell_ack(&self->doorbell);
    }
}

static int pending_drain(void *unused) {
    EngineObject *self = async_engine;
    if (!self) return 0;
    Py_INCREF(self);  /* a handler may stop() and drop the last reference */
    int rc = drain(self);
    Py_DECREF(self);
    return rc;
}

static void ring(void *arg) {
    EngineObject *self = arg;
    Py_AddPendingCall(pending_drain, NULL);  /* a full queue is fine: the signal drains too */
    pthread_kill(self->main_thread, kick_signum);
}

static PyObject *engine_start(EngineObject *self, PyObject *args) {
    int signum;
    if (!PyArg_ParseTuple(args, "i:_start_async", &signum)) return NULL;
    if (check_open(self) < 0) return NULL;
    if (self->async_on) Py_RETURN_NONE;
    if (async_engine && async_engine != self) {
        PyErr_SetString(AemError, "another aem engine already delivers asynchronously in this process");
        return NULL;
    }
    self->main_thread = pthread_self();
    self->main_tid = (pid_t)syscall(SYS_gettid);
    kick_signum = signum;
    int rc = aem_doorbell_start(&self->doorbell, self->core.epfd, self->core.wakefd, ring,
                                aem_engine_event_is_fragile, self);
    if (rc < 0) return set_errno_error(rc, "pthread_create");
    self->async_on = 1;
    direct_kick_all(self, 1);
    async_engine = self;
    Py_INCREF(self);
    Py_RETURN_NONE;
}

static PyObject *engine_drain(EngineObject *self, PyObject *noargs) {
    if (drain(self) < 0) return NULL;
    Py_RETURN_NONE;
}

/* The Python-level handler of the kick signal: _kick(signum, frame). */
PyObject *aem_kick(PyObject *module, PyObject *args) {
    if (pending_drain(NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---- host-made occurrences ------------------------------------------------------------------ */

static PyObject *engine_fire(EngineObject *self, PyObject *args) {
    PyObject *eid_obj, *payload = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:fire", &eid_obj, &payload)) return NULL;
    if (check_open(self) < 0) return NULL;
    uint64_t eid;
    if (parse_eid(eid_obj, &eid) < 0) return NULL;
    Py_INCREF(payload);
    if (aem_engine_push(&self->core, eid, 0, 0, payload) < 0) {
        PyErr_Format(AemUnknownEvent, "no registered event with id %R (unregistered?)", eid_obj);
        return NULL;
    }
    /* Fired by a handler: the delivering loop picks it up without a wake-up. */
    if (!(self->delivering && self->deliver_thread == PyThread_get_thread_ident()))
        aem_engine_wake(&self->core);
    Py_RETURN_NONE;
}

/* _push(eid, values_tuple): an occurrence made by Python code (job exits, shortages). */
static PyObject *engine_push(EngineObject *self, PyObject *args) {
    PyObject *eid_obj, *values;
    if (!PyArg_ParseTuple(args, "OO!:_push", &eid_obj, &PyTuple_Type, &values)) return NULL;
    if (check_open(self) < 0) return NULL;
    uint64_t eid;
    if (parse_eid(eid_obj, &eid) < 0) return NULL;
    Py_INCREF(values);
    if (aem_engine_push(&self->core, eid, 0, 0, values) < 0) Py_RETURN_FALSE;
    aem_engine_wake(&self->core);
    Py_RETURN_TRUE;
}

/* _deliver_now(eid, values_tuple) -> bool | None: deliver synchronously, now, in this
 * thread (vmtable shortages: the handler may free memory before the allocation is
 * retried).  False when eid is not registered, None when it is stopped. */
static PyObject *engine_deliver_now(EngineObject *self, PyObject *args) {
    PyObject *eid_obj, *values;
    if (!PyArg_ParseTuple(args, "OO!:_deliver_now", &eid_obj, &PyTuple_Type, &values)) return NULL;
    if (check_open(self) < 0) return NULL;
    uint64_t eid;
    if (parse_eid(eid_obj, &eid) < 0) return NULL;
    uint32_t slot;
    aem_reg *r = aem_engine_lookup(&self->core, eid, &slot);
    if (!r) Py_RETURN_FALSE;
    if (r->state != AEM_S_ACTIVE) Py_RETURN_NONE;  /* stopped (EVJOBSTOP): still registered */
    target_t t = target_of(r, eid, r->priority);
    PyObject *obj = r->obj;
    t.flags &= (uint16_t)~(AEM_F_FORK | AEM_F_CAPSULE);  /* synchronous means here */
    EventObject *ev = aem_event_new(r->kind, eid, aem_now_ns(), t.source);
    if (!ev) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(values) && i < 4; i++)
        ev->o[i] = Py_NewRef(PyTuple_GET_ITEM(values, i));
    Py_INCREF(t.handler);
    Py_XINCREF(obj);
    int oneshot = t.flags & AEM_F_ONESHOT;
    if (oneshot) unregister_slot(self, slot);
    self->core.stats.occurrences++;
    int rc = call_handler(self, &t, ev);
    Py_DECREF(ev);
    Py_DECREF(t.handler);
    Py_XDECREF(obj);
    settle_owed_ring(self);
    if (rc < 0) return NULL;
    Py_RETURN_TRUE;
}

/* ---- introspection ------------------------------------------------------------------------------ */

static PyObject *engine_stats(EngineObject *self, PyObject *noargs) {
    aem_engine *e = &self->core;
    uint32_t queued = 0;  /* occurrences of unregistered events leave the queue lazily: skip them */
    for (uint32_t i = 0; i < e->pqlen; i++) {
        aem_reg *r = aem_slot(e, e->pq[i].slot);
        queued += r->state != AEM_S_FREE && r->gen == e->pq[i].gen;
    }
    PyObject *per = PyDict_New();
    if (!per) return NULL;
    uint64_t delivered = 0;
    for (int k = 1; k < AEM_K__COUNT; k++) {
        delivered += e->stats.delivered[k];
        if (!e->stats.registered[k] && !e->stats.delivered[k]) continue;
        PyObject *d = Py_BuildValue("{sKsK}", "registered", (unsigned long long)e->stats.registered[k],
                                    "delivered", (unsigned long long)e->stats.delivered[k]);
        if (!d || PyDict_SetItemString(per, kind_names[k], d) < 0) {
            Py_XDECREF(d);
            Py_DECREF(per);
            return NULL;
        }
        Py_DECREF(d);
    }
    PyObject *res = Py_BuildValue(
        "{sIsIsKsKsIsIsKsKsKsKsIsNsNsKsKsN}",
        "registered", self->closed ? 0u : user_live(self),
        "internal", self->internal,
        "total_registered", (unsigned long long)e->stats.total_registered,
        "delivered", (unsigned long long)delivered,
        "queued", queued,
        "held", e->nheld,
        "occurrences", (unsigned long long)e->stats.occurrences,
        "errors", (unsigned long long)e->stats.errors,
        "dropped", (unsigned long long)e->stats.dropped,
        "wakeups", (unsigned long long)e->stats.wakeups,
        "timers", e->tlen,
        "async", PyBool_FromLong(self->async_on),
        "running", PyBool_FromLong(self->running),
        "drains", (unsigned long long)self->drains,
        "rings", (unsigned long long)(self->async_on ? self->doorbell.rings : 0),
        "per_source", per);
    return res;
}

static PyObject *engine_describe(EngineObject *self, PyObject *eid_obj) {
    if (check_open(self) < 0) return NULL;
    uint64_t eid;
    uint32_t slot;
    aem_reg *r = lookup_or_raise(self, eid_obj, &eid, &slot);
    if (!r) return NULL;
    static const char *states[] = {"free", "active", "stopped", "done"};
    PyObject *source = r->obj;
    if (source && (r->flags & AEM_F_EXTRAS)) source = PyTuple_GET_ITEM(source, 0);
    return Py_BuildValue("{sssIsisssOsOsIsL}", "kind", kind_names[r->kind], "flags",
                         (unsigned)(r->flags & AEM_F__PUBLIC), "priority", r->priority, "state",
                         states[r->state], "handler", (PyObject *)r->handler, "source",
                         source ? source : Py_None, "held", r->held, "deadline_ns",
                         (long long)(r->kind == AEM_K_TIMER ? aem_timers_deadline(&self->core, slot) : -1));
}

/* _handlers(flag_mask) -> [(eid, handler, flags, source)] of the registrations with any of those flags. */
static PyObject *engine_handlers(EngineObject *self, PyObject *arg) {
    unsigned long mask = PyLong_AsUnsignedLong(arg);
    if (mask == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    aem_engine *e = &self->core;
    for (uint32_t s = 0; s < e->nslots; s++) {
        aem_reg *r = aem_slot(e, s);
        if (r->state == AEM_S_FREE || is_internal(r) || !(r->flags & mask)) continue;
        uint64_t eid = aem_eid_of(s, r->gen);
        target_t t = target_of(r, eid, r->priority);
        PyObject *item = Py_BuildValue("(KOIO)", (unsigned long long)eid, (PyObject *)r->handler,
                                       (unsigned)(r->flags & AEM_F__PUBLIC), t.source ? t.source : Py_None);
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *engine_set_error_handler(EngineObject *self, PyObject *fn) {
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "the error handler must be callable (fn(exc, event)) or None");
        return NULL;
    }
    PyObject *old = self->error_handler ? self->error_handler : Py_None;
    Py_INCREF(old);
    Py_INCREF(fn);
    Py_XSETREF(self->error_handler, fn);
    return old;
}

static PyObject *engine_set_hooks(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"spawn", "payload", "unregister", "pool", NULL};
    PyObject *spawn = NULL, *payload = NULL, *unreg = NULL, *pool = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OOOO:_set_hooks", kwlist, &spawn, &payload, &unreg,
                                     &pool))
        return NULL;
    if (pool) Py_XSETREF(self->pool_hook, Py_NewRef(pool));
    if (spawn) Py_XSETREF(self->spawn_hook, Py_NewRef(spawn));
    if (payload) Py_XSETREF(self->payload_hook, Py_NewRef(payload));
    if (unreg) Py_XSETREF(self->unregister_hook, Py_NewRef(unreg));
    Py_RETURN_NONE;
}

static PyObject *engine_get_pid(EngineObject *self, void *c) { return PyLong_FromLong(self->owner_pid); }
static PyObject *engine_get_closed(EngineObject *self, void *c) { return PyBool_FromLong(self->closed); }
static PyObject *engine_get_running(EngineObject *self, void *c) { return PyBool_FromLong(self->running); }
static PyObject *engine_get_async(EngineObject *self, void *c) { return PyBool_FromLong(self->async_on); }
static PyObject *engine_get_delivering(EngineObject *self, void *c) {
    return PyBool_FromLong(self->delivering);
}

static PyMethodDef engine_methods[] = {
    {"register", (PyCFunction)(void (*)(void))engine_register, METH_FASTCALL | METH_KEYWORDS,
     "register(source, handler, flags=0, priority=0, constructor=None, destructor=None, pool=None)\n--\n\n"
     "Register handler for the occurrences of source; returns the event id (see aem.register)."},
    {"_add", (PyCFunction)engine_add, METH_VARARGS, "Low-level registration used by sources."},
    {"_add_timer", (PyCFunction)engine_add_timer, METH_VARARGS, "An internal one-shot timer."},
    {"_turn", (PyCFunction)engine_turn, METH_O, "One turn for an asyncio loop (timeout in ms, <0 forever)."},
    {"_remove", (PyCFunction)engine_remove, METH_O, "Unregister an eid, internal ones included."},
    {"unregister", (PyCFunction)(void (*)(void))engine_unregister, METH_VARARGS | METH_KEYWORDS,
     "unregister(eid, missing_ok=False)\n--\n\nRemove a registration; True if it existed."},
    {"control", (PyCFunction)engine_control, METH_VARARGS,
     "control(eid, op, arg=None)\n--\n\nEVJOBPRIO, EVJOBSTOP, EVJOBSTART, EVJOBSHTDN."},
    {"run", (PyCFunction)(void (*)(void))engine_run, METH_VARARGS | METH_KEYWORDS,
     "run(timeout=None, until_idle=True)\n--\n\nDeliver events in this thread; returns why it ended: "
     "'stopped', 'idle', 'timeout' or 'closed'."},
    {"stop", (PyCFunction)engine_stop, METH_NOARGS, "stop()\n--\n\nEnd run() and asynchronous delivery."},
    {"_start_async", (PyCFunction)engine_start, METH_VARARGS, "Start the doorbell thread."},
    {"_drain", (PyCFunction)engine_drain, METH_NOARGS, "Deliver what is ready now."},
    {"fire", (PyCFunction)engine_fire, METH_VARARGS, "fire(eid, payload=None)\n--\n\nFire a user event."},
    {"_push", (PyCFunction)engine_push, METH_VARARGS, "Queue an occurrence made by Python code."},
    {"_deliver_now", (PyCFunction)engine_deliver_now, METH_VARARGS, "Deliver synchronously (vmtable shortage)."},
    {"stats", (PyCFunction)engine_stats, METH_NOARGS, "stats()\n--\n\nCounters of the engine."},
    {"describe", (PyCFunction)engine_describe, METH_O,
     "describe(eid)\n--\n\nWhat the engine knows of one registration (kind, state, priority ...)."},
    {"set_error_handler", (PyCFunction)engine_set_error_handler, METH_O,
     "set_error_handler(fn)\n--\n\nfn(exc, event) receives handler exceptions; returns the previous one."},
    {"_handlers", (PyCFunction)engine_handlers, METH_O, "Registrations with any of these flags."},
    {"_set_hooks", (PyCFunction)(void (*)(void))engine_set_hooks, METH_VARARGS | METH_KEYWORDS, NULL},
    {"close", (PyCFunction)engine_close, METH_NOARGS, "close()\n--\n\nRelease every registration and fd."},
    {"_abandon", (PyCFunction)engine_abandon, METH_NOARGS, "Forget the engine in a forked child."},
    {NULL},
};

static PyGetSetDef engine_getset[] = {
    {"pid", (getter)engine_get_pid, NULL, "The process that created the engine.", NULL},
    {"closed", (getter)engine_get_closed, NULL, "True once closed.", NULL},
    {"running", (getter)engine_get_running, NULL, "True while run() is in progress.", NULL},
    {"async_delivery", (getter)engine_get_async, NULL, "True between start() and stop().", NULL},
    {"delivering", (getter)engine_get_delivering, NULL, "True while a handler runs.", NULL},
    {NULL},
};

static PyMemberDef engine_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(EngineObject, weakreflist), READONLY, NULL},
    {NULL},
};

static PyType_Slot engine_slots[] = {
    {Py_tp_new, engine_new},
    {Py_tp_dealloc, engine_dealloc},
    {Py_tp_traverse, engine_traverse},
    {Py_tp_clear, engine_clear},
    {Py_tp_methods, engine_methods},
    {Py_tp_getset, engine_getset},
    {Py_tp_members, engine_members},
    {Py_tp_doc, "The C core of an aem engine. Use aem.Engine (or the module-level functions)."},
    {0, NULL},
};

static PyType_Spec engine_spec = {
    .name = "aem._core.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = engine_slots,
};

int aem_engine_init_type(PyObject *module) {
    AemEngine_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &engine_spec, NULL);
    if (!AemEngine_Type) return -1;
    return PyModule_AddObjectRef(module, "Engine", (PyObject *)AemEngine_Type);
}
