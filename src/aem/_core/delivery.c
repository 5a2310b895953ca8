/* delivery.c — one occurrence to its handler (aem._core.Engine's delivery; see pyengine.h).
 *
 *   registration finished? (one-shot timer, EVF_ONESHOT, Close, ChildExit)
 *        -> unregistered first, so the handler sees itself gone
 *   kind work: accept() the connections, recv() the data, reap the child ...
 *   constructor(event) -> handler(event) | spawn hook (EVF_FORK/EVF_CAPSULE)
 *        -> destructor(event) (also when the handler raised)
 *   an Exception from any of them is counted and given to the error handler;
 *   a BaseException (KeyboardInterrupt, SystemExit) propagates to the caller
 *   of run() or to the interrupted main thread.
 */
#define _GNU_SOURCE
#include "pyengine.h"
#include "handoff.h"
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


#ifndef P_PIDFD
#define P_PIDFD 3
#endif

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


/* The exception set, normalised, with its traceback (PyErr_GetRaisedException of 3.12);
 * declared in pyaem.h (the HTTP fast path uses it too). */
PyObject *aem_fetch_exception(void) {
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
 * unregistered and one AemError names it (eid, source, the last exception as its
 * __cause__): it goes to whoever awaits the registration (Engine._gave_up: aem.wait,
 * aem.events), else to the error handler.  Returns 0, or -1 when a BaseException must
 * propagate. */
static int source_failed(EngineObject *self, const target_t *t) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    self->core.stats.errors++;
    PyObject *exc = aem_fetch_exception();
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
    aem_py_forget_failures(self, t->eid);
    uint32_t slot;
    if (aem_engine_lookup(&self->core, t->eid, &slot)) aem_py_unregister_slot(self, slot);
    PyErr_Format(AemError, "event %llu (%R) failed %ld times in a row and was unregistered: %R",
                 (unsigned long long)t->eid, t->source ? t->source : Py_None, n, exc);
    PyObject *err = aem_fetch_exception();
    PyException_SetCause(err, exc);  /* steals exc */
    PyObject *taken = PyObject_CallMethod((PyObject *)self, "_gave_up", "KO", (unsigned long long)t->eid, err);
    int awaited = taken ? PyObject_IsTrue(taken) : -1;
    Py_XDECREF(taken);
    if (awaited > 0) {  /* counted above, raised where it is awaited */
        Py_DECREF(err);
        return 0;
    }
    if (awaited < 0 && report(self, NULL) < 0) {  /* _gave_up itself failed: reported first */
        Py_DECREF(err);
        return -1;
    }
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
int aem_py_call_handler(EngineObject *self, const target_t *t, EventObject *ev) {
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
        rc = aem_py_call_handler(self, t, ev);
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
    int rc = aem_py_call_handler(self, t, ev);
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
        rc = aem_py_call_handler(self, t, ev);
        Py_DECREF(ev);
        if (rc < 0) break;
    }
    Py_DECREF(it);
    if (rc == 0 && PyErr_Occurred()) return source_failed(self, t);  /* the iteration raised */
    if (rc == 0) source_ok(self, t->eid);
    return rc;
}

/* What delivering to registration r needs (borrowed references). */
target_t aem_py_target_of(const aem_reg *r, uint64_t eid, int32_t priority) {
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
    if (aem_engine_lookup(&self->core, t->eid, &slot)) aem_py_unregister_slot(self, slot);
}

int aem_py_deliver_one(EngineObject *self, aem_occ *o) {
    aem_engine *e = &self->core;
    aem_reg *r = aem_slot(e, o->slot);
    target_t t = aem_py_target_of(r, aem_eid_of(o->slot, o->gen), o->priority);
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
        rc = aem_loop_wake(t.handler, t.eid);
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
    if (rc == 0) rc = aem_py_call_handler(self, &t, ev);
done:
    Py_XDECREF(o->obj);
    o->obj = NULL;
    Py_XDECREF(ev);
    Py_DECREF(t.handler);
    Py_XDECREF(obj);
    return rc;
}
