/* loop_fd.c — the fds of aem.EventLoop: the engine handlers that queue their handles
 * (wakers) and the socket read into the loop's shared buffer.
 *
 * A waker replaces asyncio's select() + _process_events(): the engine delivers a
 * readiness occurrence to it during the loop's engine turn and it queues the reader's
 * (or writer's) handle of the fd's selector key straight into the loop's ready ring.
 *
 * Only the loop's own turn queues handles: as in asyncio, an fd's handle is queued once per
 * poll.  The engine may deliver a waker outside the loop's turn too -- aem.start()'s
 * asynchronous drain while callbacks run, aem.run() while the loop is not running -- and the
 * loop's fds are level-triggered: queueing there would queue the same handle on every drain
 * step, and the doorbell would ring again as soon as it is acknowledged (a ready fd stays
 * ready until the loop's handle runs).  Such a waker *parks* its registration instead (stops
 * it: the fd leaves the epoll interest set, nothing is queued); the loop re-arms what was
 * parked just before its next poll, which then reports the fd if it is still ready.
 *
 * Errors: functions return 0 or NULL/-1 with a Python exception set.
 */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

/* A waker is the engine handler of one direction of one fd of the loop: when the engine
 * delivers, it queues the reader's (or writer's) handle of the fd's selector key, as
 * asyncio's _process_events does. */
typedef struct {
    PyObject_HEAD
    LoopCoreObject *core;
    PyObject *fd;     /* int: the key in fd_to_key */
    int write;
} WakerObject;

static PyTypeObject *Waker_Type;

/* Queue the handle of w's direction of its fd (the loop's turn). Returns 0 or -1. */
static int waker_queue(WakerObject *w) {
    LoopCoreObject *c = w->core;
    if (!c->fd_to_key) return 0;
    PyObject *key = PyDict_GetItemWithError(c->fd_to_key, w->fd);  /* borrowed */
    if (!key) return PyErr_Occurred() ? -1 : 0;  /* unregistered meanwhile */
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) < 4) {
        PyErr_SetString(PyExc_TypeError, "selector key is not a SelectorKey");
        return -1;
    }
    PyObject *data = PyTuple_GET_ITEM(key, 3);
    if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2) return 0;
    PyObject *h = PyTuple_GET_ITEM(data, w->write);
    if (h == Py_None) return 0;
    if (!PyObject_TypeCheck(h, c->handle_type)) {
        PyErr_SetString(PyExc_TypeError, "selector key data holds no asyncio.Handle");
        return -1;
    }
    if (is_cancelled(h)) {
        PyObject *fileobj = Py_NewRef(PyTuple_GET_ITEM(key, 0));
        PyObject *r = PyObject_CallOneArg(c->remove_fd[w->write], fileobj);
        Py_DECREF(fileobj);
        if (!r) return -1;
        Py_DECREF(r);
        return 0;
    }
    return aem_loop_ring_push(c, Py_NewRef(h));
}

/* Outside the loop's turn: stop registration eid until the loop's next poll. Returns 0 or -1. */
static int waker_park(WakerObject *w, uint64_t eid) {
    LoopCoreObject *c = w->core;
    uint32_t slot;
    if (!c->engine || c->engine->closed || !aem_engine_lookup(&c->engine->core, eid, &slot)) return 0;
    if (c->nparked == c->parkcap) {
        Py_ssize_t cap = c->parkcap ? c->parkcap * 2 : 16;
        uint64_t *p = PyMem_Realloc(c->parked, sizeof(uint64_t) * (size_t)cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        c->parked = p;
        c->parkcap = cap;
    }
    int rc = aem_engine_stop_reg(&c->engine->core, slot);
    if (rc < 0) {
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    c->parked[c->nparked++] = eid;
    return 0;
}

void aem_loop_unpark(LoopCoreObject *self) {
    for (Py_ssize_t i = 0; i < self->nparked; i++) {
        uint32_t slot;
        if (self->engine && !self->engine->closed &&
            aem_engine_lookup(&self->engine->core, self->parked[i], &slot))
            (void)aem_engine_start_reg(&self->engine->core, slot);  /* an fd closed meanwhile: gone */
    }
    self->nparked = 0;
}

/* Called as a Python object (not through the engine's fast path): the registration is not
 * known, so outside the loop's turn nothing is done. */
static PyObject *waker_call(WakerObject *w, PyObject *args, PyObject *kwds) {
    if (w->core->in_turn && waker_queue(w) < 0) return NULL;
    Py_RETURN_NONE;
}

/* The engine's fast path (delivery.c, aem_py_deliver_one): a waker runs without an Event object
 * nor an argument tuple.  Its errors go to the engine's error handler with event None. */
int aem_loop_is_waker(PyObject *handler) { return Waker_Type && Py_IS_TYPE(handler, Waker_Type); }

int aem_loop_wake(PyObject *waker, uint64_t eid) {
    WakerObject *w = (WakerObject *)waker;
    return w->core->in_turn ? waker_queue(w) : waker_park(w, eid);
}

/* waker(fd, write) -> the engine handler for fd's readiness to read (write=False) or write. */
PyObject *aem_loop_waker(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyLong_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "waker(fd: int, write: bool)");
        return NULL;
    }
    int write = PyObject_IsTrue(args[1]);
    if (write < 0) return NULL;
    WakerObject *w = PyObject_GC_New(WakerObject, Waker_Type);
    if (!w) return NULL;
    w->core = (LoopCoreObject *)Py_NewRef(self);
    w->fd = Py_NewRef(args[0]);
    w->write = write;
    PyObject_GC_Track(w);
    return (PyObject *)w;
}

static int waker_traverse(WakerObject *w, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(w));
    Py_VISIT(w->core);
    Py_VISIT(w->fd);
    return 0;
}

static int waker_clear(WakerObject *w) {
    Py_CLEAR(w->core);
    Py_CLEAR(w->fd);
    return 0;
}

static void waker_dealloc(WakerObject *w) {
    PyTypeObject *tp = Py_TYPE(w);
    PyObject_GC_UnTrack(w);
    waker_clear(w);
    PyObject_GC_Del(w);
    Py_DECREF(tp);
}

static PyType_Slot waker_slots[] = {
    {Py_tp_doc, "The engine handler of one direction of one fd of an aem.EventLoop."},
    {Py_tp_call, waker_call},
    {Py_tp_dealloc, waker_dealloc},
    {Py_tp_traverse, waker_traverse},
    {Py_tp_clear, waker_clear},
    {0, NULL},
};

static PyType_Spec waker_spec = {
    .name = "aem._core.LoopWaker",
    .basicsize = sizeof(WakerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = waker_slots,
};

/* ---- socket reads for the transports ------------------------------------------------------------------ */

/* One read of a socket into a bytes object of exactly what came.  A small read goes into one
 * shared buffer of RECV_BUF bytes (the GIL is held throughout) and is copied out.  When the reader
 * expects a big one (`guess`: the size of its last read, RECV_HANDOVER or more), the read goes
 * straight into a new bytes object of that size, the shared buffer catching any excess (readv):
 * what fits is handed over without a copy, shrunk in place (a heap block: `guess` stays below
 * glibc's mmap threshold, so no mmap/munmap per read).  socket.recv(max_size), asyncio's way,
 * allocates max_size bytes on every read (256 KiB for its transports: an mmap and its page
 * faults per read). */
#define RECV_BUF (256 * 1024)
#define RECV_HANDOVER (16 * 1024)
#define RECV_GUESS_MAX (96 * 1024)
static char *recv_buf;

PyObject *aem_loop_read(int fd, size_t max, size_t guess, int *err) {
    *err = 0;
    if (!recv_buf && !(recv_buf = PyMem_RawMalloc(RECV_BUF))) return PyErr_NoMemory();
    if (max > RECV_BUF) max = RECV_BUF;
    if (guess > RECV_GUESS_MAX) guess = RECV_GUESS_MAX;
    PyObject *b = NULL;
    if (guess >= RECV_HANDOVER && guess < max && !(b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)guess)))
        return NULL;
    ssize_t n;
    do {
        if (b) {
            struct iovec iov[2] = {{PyBytes_AS_STRING(b), guess}, {recv_buf, max - guess}};
            n = readv(fd, iov, 2);
        } else {
            n = recv(fd, recv_buf, max, 0);
        }
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    if (n < 0) {
        if (!PyErr_Occurred()) *err = errno;
        Py_XDECREF(b);
        return NULL;
    }
    if (!b) return PyBytes_FromStringAndSize(recv_buf, n);
    if ((size_t)n <= guess) return _PyBytes_Resize(&b, n) < 0 ? NULL : b;  /* a shrink, in place */
    PyObject *all = PyBytes_FromStringAndSize(NULL, n);  /* more than guessed: copied together */
    if (all) {
        memcpy(PyBytes_AS_STRING(all), PyBytes_AS_STRING(b), guess);
        memcpy(PyBytes_AS_STRING(all) + guess, recv_buf, (size_t)n - guess);
    }
    Py_DECREF(b);
    return all;
}

Py_ssize_t aem_loop_read_append(int fd, PyObject *buf, size_t guess, int *err) {
    *err = 0;
    if (!recv_buf && !(recv_buf = PyMem_RawMalloc(RECV_BUF))) {
        PyErr_NoMemory();
        return -1;
    }
    if (guess > RECV_GUESS_MAX) guess = RECV_GUESS_MAX;
    size_t direct = guess >= RECV_HANDOVER ? guess : 0; /* a big read expected: straight into buf */
    Py_ssize_t blen = PyByteArray_GET_SIZE(buf);
    if (direct && PyByteArray_Resize(buf, blen + (Py_ssize_t)direct) < 0) return -1;
    ssize_t n;
    do {
        if (direct) {
            struct iovec iov[2] = {{PyByteArray_AS_STRING(buf) + blen, direct}, {recv_buf, RECV_BUF - direct}};
            n = readv(fd, iov, 2);
        } else {
            n = recv(fd, recv_buf, RECV_BUF, 0);
        }
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    int e = errno;
    if (n <= 0) {
        if (direct && PyByteArray_Resize(buf, blen) < 0) return -1;
        if (n < 0 && !PyErr_Occurred()) *err = e;
        return n < 0 ? -1 : 0;
    }
    size_t spill = (size_t)n > direct ? (size_t)n - direct : 0; /* what landed in the shared buffer */
    if (PyByteArray_Resize(buf, blen + n) < 0) return -1;
    if (spill) memcpy(PyByteArray_AS_STRING(buf) + blen + (n - (Py_ssize_t)spill), recv_buf, spill);
    return n;
}

/* A file descriptor argument: its value, or -1 with an exception set (OSError EBADF when out of
 * range). */
static int fd_arg(PyObject *o) {
    long fd = PyLong_AsLong(o);
    if (fd == -1 && PyErr_Occurred()) return -1;
    if (fd < 0 || fd > INT32_MAX) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (int)fd;
}

/* recv(fd, max_size) -> bytes: one read (b"" at EOF); OSError (BlockingIOError ...) on failure. */
PyObject *aem_loop_recv(PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv(fd, max_size)");
        return NULL;
    }
    int fd = fd_arg(args[0]);
    if (fd < 0) return NULL;
    Py_ssize_t max = PyLong_AsSsize_t(args[1]);
    if (max == -1 && PyErr_Occurred()) return NULL;
    if (max <= 0) {
        PyErr_SetString(PyExc_ValueError, "max_size must be positive");
        return NULL;
    }
    int err;
    PyObject *b = aem_loop_read(fd, (size_t)max, 0, &err);
    if (!b && err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return b;
}

/* ---- a listening socket's new connections ------------------------------------------------------------ */

/* The peer's address as socket.accept() gives it (CPython's makesockaddr): (host, port) for
 * AF_INET, (host, port, flowinfo, scope_id) for AF_INET6, the path for AF_UNIX (bytes in the
 * abstract namespace); None for another family (the caller asks getpeername()). */
/* "a.b.c.d" of an IPv4 address in network order, what inet_ntop writes (without its
 * snprintf: ~2k instructions a connection). */
static size_t ipv4_text(const struct in_addr *in, char *out) {
    const unsigned char *b = (const unsigned char *)&in->s_addr;
    char *p = out;
    for (int i = 0; i < 4; i++) {
        unsigned v = b[i];
        if (v >= 100) *p++ = (char)('0' + v / 100);
        if (v >= 10) *p++ = (char)('0' + v / 10 % 10);
        *p++ = (char)('0' + v % 10);
        if (i < 3) *p++ = '.';
    }
    return (size_t)(p - out);
}

static PyObject *peer_address(const struct sockaddr_storage *ss, socklen_t len) {
    char host[NI_MAXHOST];
    switch (ss->ss_family) {
    case AF_INET: {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        PyObject *h = PyUnicode_FromStringAndSize(host, (Py_ssize_t)ipv4_text(&a->sin_addr, host));
        return h ? Py_BuildValue("(Ni)", h, (int)ntohs(a->sin_port)) : NULL;
    }
    case AF_INET6: {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (getnameinfo((const struct sockaddr *)ss, len, host, sizeof host, NULL, 0, NI_NUMERICHOST)) break;
        return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port), (unsigned)ntohl(a->sin6_flowinfo),
                             (unsigned)a->sin6_scope_id);
    }
    case AF_UNIX: {
        const struct sockaddr_un *a = (const struct sockaddr_un *)ss;
        size_t n = len > offsetof(struct sockaddr_un, sun_path) ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (n > 0 && a->sun_path[0] == 0) return PyBytes_FromStringAndSize(a->sun_path, (Py_ssize_t)n);
        return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, (Py_ssize_t)strnlen(a->sun_path, n));
    }
    }
    Py_RETURN_NONE;
}

/* accept(fd) -> (conn_fd, address) | None: one connection from listening socket fd, its
 * descriptor close-on-exec (as socket.accept()); None when none is pending, so draining the
 * backlog costs no BlockingIOError.  A connection the peer aborted before it was taken is
 * skipped; other failures raise OSError (EMFILE ...). */
PyObject *aem_loop_accept(PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "accept(fd)");
        return NULL;
    }
    int lfd = fd_arg(args[0]);
    if (lfd < 0) return NULL;
    struct sockaddr_storage ss;
    socklen_t len;
    int fd;
    for (;;) {
        memset(&ss, 0, sizeof ss);
        len = sizeof ss;
        fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        if (fd >= 0) break;
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        if (errno == ECONNABORTED) continue;
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0) return NULL;
            continue;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *addr = peer_address(&ss, len);
    PyObject *r = addr ? Py_BuildValue("(iN)", fd, addr) : NULL;
    if (!r) close(fd);
    return r;
}

int aem_loop_waker_init_type(PyObject *module) {
    Waker_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &waker_spec, NULL);
    return Waker_Type ? 0 : -1;
}
