/* pyengine.c — aem._core.Engine: lifetime, registration, control, run(), host-made
 * occurrences, introspection.  Delivery of one occurrence is in delivery.c, asynchronous
 * delivery (start()/stop()) in async_delivery.c; pyengine.h is what the three share.
 *
 * Two ways to drive the engine:
 *   run():   the calling thread waits in epoll_wait (GIL released) and delivers.
 *   start(): the doorbell thread waits and the main thread is interrupted to drain
 *            (async_delivery.c).
 */
#define _GNU_SOURCE
#include "pyengine.h"
#include "vmtable_py.h"

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

PyTypeObject *AemEngine_Type;

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

int aem_py_check_open(EngineObject *self) {
    if (self->closed) {
        PyErr_SetString(AemError, "this aem engine is closed (or belongs to the parent of a forked process)");
        return -1;
    }
    return 0;
}

PyObject *aem_py_errno_error(int neg_errno, const char *what) {
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

static inline uint32_t user_live(EngineObject *self) { return self->core.live - self->internal; }

/* The registration delivered normally: its run of failures (if any) ends. */
void aem_py_forget_failures(EngineObject *self, uint64_t eid) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *key = PyLong_FromUnsignedLongLong(eid);
    if (!key || PyDict_DelItem(self->failures, key) < 0) PyErr_Clear();
    Py_XDECREF(key);
    PyErr_Restore(type, value, tb);
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
    if (self->failures && PyDict_GET_SIZE(self->failures)) aem_py_forget_failures(self, eid);
    if (self->async_on && fd >= 0 && (uint32_t)fd < self->core.fdcap && !self->core.fds[fd].events)
        aem_py_direct_kick(self, fd, 0);
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

void aem_py_unregister_slot(EngineObject *self, uint32_t slot) { unregister_slot_ex(self, slot, 0); }

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
        return aem_py_errno_error(rc, "aem engine");
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

static void engine_close_impl(EngineObject *self, int in_child) {
    if (self->closed) return;
    aem_py_stop_async(self, in_child);
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
        aem_py_unregister_slot(self, (uint32_t)slot);
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
    if (aem_py_check_open(self) < 0) return NULL;
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
    if (aem_py_check_open(self) < 0) return NULL;
    int64_t after = aem_seconds_to_ns(after_obj, "after", 1);
    if (after < 0) return NULL;
    int64_t slot = aem_engine_new_reg(&self->core, AEM_K_TIMER, AEM_F_INTERNAL, 0, handler, NULL);
    if (slot < 0) return PyErr_NoMemory();
    Py_INCREF(handler);
    self->internal++;
    if (aem_engine_arm_timer(&self->core, (uint32_t)slot, aem_now_ns() + after, after) < 0) {
        aem_py_unregister_slot(self, (uint32_t)slot);
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
    if (aem_py_check_open(self) < 0) return NULL;
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
        if (rc == 0 && self->async_on) aem_py_direct_kick(self, fd, 1);
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
        aem_py_errno_error(rc, what);
        goto fail;
    }
    return new_eid_result(self, (uint32_t)slot);
fail:
    aem_py_unregister_slot(self, (uint32_t)slot);
    return NULL;
}

static PyObject *engine_unregister(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"eid", "missing_ok", NULL};
    PyObject *eid_obj;
    int missing_ok = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:unregister", kwlist, &eid_obj, &missing_ok))
        return NULL;
    if (aem_py_check_open(self) < 0) return NULL;
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
    aem_py_unregister_slot(self, slot);
    Py_RETURN_TRUE;
}

static PyObject *engine_control(EngineObject *self, PyObject *args) {
    PyObject *eid_obj, *arg = Py_None;
    int op;
    if (!PyArg_ParseTuple(args, "Oi|O:control", &eid_obj, &op, &arg)) return NULL;
    if (aem_py_check_open(self) < 0) return NULL;
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
    if (rc < 0) return aem_py_errno_error(rc, "control");
    Py_RETURN_NONE;
}

static int engine_step_inner(EngineObject *self, int timeout_ms);

/* One turn: wait up to timeout_ms, collect, deliver what was pending.
 * Returns the number of occurrences delivered, or -1 with an exception set. */
int aem_py_engine_step(EngineObject *self, int timeout_ms) {
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
        aem_py_errno_error(n, "epoll_wait");
        return -1;
    }
    if (n > 0) aem_engine_collect(e, e->evbuf, n);
    uint32_t budget = e->pqlen;
    int delivered = 0;
    aem_occ o;
    while (budget-- && !self->closed && aem_engine_pop(e, &o)) {
        delivered++;
        if (aem_py_deliver_one(self, &o) < 0) return -1;
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
    if (aem_py_check_open(self) < 0) return NULL;
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
        if (aem_py_engine_step(self, timeout_ms) < 0) {
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
    if (aem_py_check_open(self) < 0) return -1;
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
    /* No non-blocking look first when the last turn delivered (busy): the loop asks to block only
     * when nothing is ready, and in a request-response exchange the look finds nothing (measured:
     * a second epoll_wait per message of an echo). */
    self->busy = 0;
    int n = aem_py_engine_step(self, timeout_ms);
    self->running = 0;
    self->stop_requested = 0;
    if (self->async_on) aem_doorbell_pause(&self->doorbell, 0);
    return n;
}

/* Unregister eid, internal registrations included. Returns 1, or 0 when it is gone. */
int aem_py_engine_remove(EngineObject *self, uint64_t eid) {
    uint32_t slot;
    if (self->closed || !aem_engine_lookup(&self->core, eid, &slot)) return 0;
    aem_py_unregister_slot(self, slot);
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
    aem_py_stop_async(self, 0);
    Py_RETURN_NONE;
}

/* ---- host-made occurrences ------------------------------------------------------------------ */

static PyObject *engine_fire(EngineObject *self, PyObject *args) {
    PyObject *eid_obj, *payload = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:fire", &eid_obj, &payload)) return NULL;
    if (aem_py_check_open(self) < 0) return NULL;
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
    if (aem_py_check_open(self) < 0) return NULL;
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
    if (aem_py_check_open(self) < 0) return NULL;
    uint64_t eid;
    if (parse_eid(eid_obj, &eid) < 0) return NULL;
    uint32_t slot;
    aem_reg *r = aem_engine_lookup(&self->core, eid, &slot);
    if (!r) Py_RETURN_FALSE;
    if (r->state != AEM_S_ACTIVE) Py_RETURN_NONE;  /* stopped (EVJOBSTOP): still registered */
    target_t t = aem_py_target_of(r, eid, r->priority);
    PyObject *obj = r->obj;
    t.flags &= (uint16_t)~(AEM_F_FORK | AEM_F_CAPSULE);  /* synchronous means here */
    EventObject *ev = aem_event_new(r->kind, eid, aem_now_ns(), t.source);
    if (!ev) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(values) && i < 4; i++)
        ev->o[i] = Py_NewRef(PyTuple_GET_ITEM(values, i));
    Py_INCREF(t.handler);
    Py_XINCREF(obj);
    int oneshot = t.flags & AEM_F_ONESHOT;
    if (oneshot) aem_py_unregister_slot(self, slot);
    self->core.stats.occurrences++;
    int rc = aem_py_call_handler(self, &t, ev);
    Py_DECREF(ev);
    Py_DECREF(t.handler);
    Py_XDECREF(obj);
    aem_py_settle_owed_ring(self);
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
    if (aem_py_check_open(self) < 0) return NULL;
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
    if (aem_py_check_open(self) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    aem_engine *e = &self->core;
    for (uint32_t s = 0; s < e->nslots; s++) {
        aem_reg *r = aem_slot(e, s);
        if (r->state == AEM_S_FREE || is_internal(r) || !(r->flags & mask)) continue;
        uint64_t eid = aem_eid_of(s, r->gen);
        target_t t = aem_py_target_of(r, eid, r->priority);
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
    {"_start_async", (PyCFunction)aem_py_engine_start, METH_VARARGS, "Start the doorbell thread."},
    {"_drain", (PyCFunction)aem_py_engine_drain, METH_NOARGS, "Deliver what is ready now."},
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
