/* handoff.c — the native capsule hand-off (see handoff.h for the record).
 *
 * Parent side:  handoff_encode(event, op) -> (record, fd object) or None
 *               handoff_send(sockfd, record, fd=-1)
 * Capsule side: handoff_recv(sockfd, sources) -> None (end of stream)
 *                   | (op, eid, event)          a native record
 *                   | (0, data, [fds])          anything else (the pickled path)
 *               _handoff_parse(data, fds, sources) -> (op, eid, event)   (tests, fuzzing)
 *
 * Errors: OSError from the system calls, ValueError for a malformed record,
 * TypeError for misuse.  The receive buffer is the process's own (one
 * receiving thread per process: a capsule's main thread).
 */
#include "handoff.h"
#include "vmtable.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <structmember.h>

#define HO_FDS_MAX 16
#define HO_BUF (AEM_HO_MAX_DATA + 16 * 1024)

/* ---- encoding (parent) -------------------------------------------------------- */

static int fits_i64(PyObject *o, int64_t *out) {
    if (!PyLong_CheckExact(o)) return 0;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = (int64_t)v;
    return 1;
}

/* The text of a str slot, or NULL (with no error) when the slot is None/empty. */
static int text_of(PyObject *o, const char **s, Py_ssize_t *n) {
    *s = NULL;
    *n = 0;
    if (!o || o == Py_None) return 1;
    if (!PyUnicode_CheckExact(o)) return 0;
    *s = PyUnicode_AsUTF8AndSize(o, n);
    if (!*s) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* What one record is made of: the header, its data (borrowed from the event, or
 * from view, which the caller releases) and what travels as an fd (NULL: the fd
 * number ev->b; Py_None: nothing; else the socket, borrowed). */
typedef struct {
    aem_ho_header h;
    const char *data;
    Py_ssize_t dlen;
    Py_buffer view;
    PyObject *fdobj;
} ho_parts;

/* 1: ev encoded into p (release p->view when p->view.obj); 0: ev needs the pickled path. */
static int encode_parts(EventObject *ev, int op, ho_parts *p) {
    memset(p, 0, sizeof *p);
    if (ev->dict && PyDict_GET_SIZE(ev->dict) > 0) return 0;  /* a constructor's data: pickled */
    aem_ho_header h;
    memset(&h, 0, sizeof h);
    h.magic = AEM_HO_MAGIC;
    h.version = AEM_HO_VERSION;
    h.op = (uint8_t)op;
    h.kind = ev->kind;
    h.eid = ev->eid;
    h.time_ns = ev->time_ns;
    h.a = ev->a;
    h.b = ev->b;
    const char *data = NULL;
    Py_ssize_t dlen = 0;
    Py_buffer view = {0};
    PyObject *fdobj = Py_None;
    PyObject **o = ev->o;
    switch (ev->kind) {
    case AEM_K_USER:
        if (!o[0] || o[0] == Py_None) break;
        if (fits_i64(o[0], &h.i0)) {
            h.flags |= AEM_HO_P_INT;
        } else if (PyBytes_CheckExact(o[0]) && PyBytes_GET_SIZE(o[0]) <= AEM_HO_MAX_DATA) {
            h.flags |= AEM_HO_P_BYTES;
            data = PyBytes_AS_STRING(o[0]);
            dlen = PyBytes_GET_SIZE(o[0]);
        } else {
            return 0;
        }
        break;
    case AEM_K_TIMER:
        h.i0 = ev->t_after;
        h.i1 = ev->t_interval;
        break;
    case AEM_K_SIGNAL:
        break;
    case AEM_K_READABLE:
    case AEM_K_WRITABLE:
        h.flags |= AEM_HO_HAS_FD;
        fdobj = NULL;  /* the fd number, made below */
        break;
    case AEM_K_ACCEPT:
        if (!o[0] || o[0] == Py_None) return 0;
        h.flags |= AEM_HO_HAS_FD;
        fdobj = o[0];
        break;
    case AEM_K_READ:
        if (!o[0] || o[0] == Py_None) return 0;
        if (PyObject_GetBuffer(o[0], &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return 0;
        }
        if (view.len > AEM_HO_MAX_DATA) {
            PyBuffer_Release(&view);
            return 0;
        }
        data = view.buf;
        dlen = view.len;
        h.flags |= AEM_HO_HAS_FD;
        fdobj = NULL;
        break;
    case AEM_K_CHILD:
    case AEM_K_JOB:
        if (!o[0] || !fits_i64(o[0], &h.i0)) return 0;
        if (o[1] && o[1] != Py_None) {
            if (!fits_i64(o[1], &h.i1)) return 0;
            h.flags |= AEM_HO_RC;
        }
        if (o[2] && o[2] != Py_None) {
            if (!fits_i64(o[2], &h.i2)) return 0;
            h.flags |= AEM_HO_JOB;
        }
        if (!text_of(o[3], &data, &dlen) || dlen > AEM_HO_MAX_DATA) return 0;
        if (data) h.flags |= AEM_HO_TEXT;
        break;
    case AEM_K_FILE:
        if (!text_of(o[0], &data, &dlen) || dlen > AEM_HO_MAX_DATA) return 0;
        if (data) h.flags |= AEM_HO_TEXT;
        break;
    default:
        return 0;  /* Close, pressure, custom, hosted: the pickled path */
    }
    h.data_len = (uint32_t)dlen;
    p->h = h;
    p->data = data;
    p->dlen = dlen;
    p->view = view;
    p->fdobj = fdobj;
    return 1;
}

static PyObject *handoff_encode(PyObject *mod, PyObject *args) {
    PyObject *obj;
    int op;
    if (!PyArg_ParseTuple(args, "Oi:handoff_encode", &obj, &op)) return NULL;
    if (op != AEM_HO_RUN && op != AEM_HO_KEEP) {
        PyErr_SetString(PyExc_ValueError, "op must be 1 (run) or 2 (keep)");
        return NULL;
    }
    if (!PyObject_TypeCheck(obj, AemEvent_Type)) Py_RETURN_NONE;
    EventObject *ev = (EventObject *)obj;
    ho_parts p;
    if (!encode_parts(ev, op, &p)) Py_RETURN_NONE;
    PyObject *rec = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof p.h + p.dlen);
    if (rec) {
        memcpy(PyBytes_AS_STRING(rec), &p.h, sizeof p.h);
        if (p.dlen) memcpy(PyBytes_AS_STRING(rec) + sizeof p.h, p.data, (size_t)p.dlen);
    }
    if (p.view.obj) PyBuffer_Release(&p.view);
    if (!rec) return NULL;
    PyObject *fd = p.fdobj ? Py_NewRef(p.fdobj) : PyLong_FromUnsignedLongLong(ev->b);
    if (!fd) {
        Py_DECREF(rec);
        return NULL;
    }
    return Py_BuildValue("(NN)", rec, fd);
}

/* sendmsg() iov and, when fd >= 0, the fd in SCM_RIGHTS: 0 or an errno. */
static int sendmsg_fd(int sock, struct iovec *iov, size_t iovlen, int fd, int flags) {
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = iovlen};
    if (fd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    return sendmsg(sock, &msg, flags) < 0 ? errno : 0;
}

static PyObject *handoff_send(PyObject *mod, PyObject *args) {
    int sockfd, fd = -1;
    Py_buffer rec;
    if (!PyArg_ParseTuple(args, "iy*|i:handoff_send", &sockfd, &rec, &fd)) return NULL;
    struct iovec iov = {rec.buf, (size_t)rec.len};
    int err = sendmsg_fd(sockfd, &iov, 1, fd, MSG_NOSIGNAL);
    PyBuffer_Release(&rec);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* ---- parsing (capsule) -------------------------------------------------------- */

static PyObject *bad(const char *why) {
    PyErr_Format(PyExc_ValueError, "malformed capsule record: %s", why);
    return NULL;
}

static PyObject *int_or_none(int present, int64_t v) {
    return present ? PyLong_FromLongLong((long long)v) : Py_NewRef(Py_None);
}

static PyObject *text_or_none(int present, const char *s, size_t n) {
    return present ? PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, "strict") : Py_NewRef(Py_None);
}

/* A blocking socket on fd (the capsule's own): socket.socket(fileno=fd).  NULL: fd not taken. */
static PyObject *socket_on(int fd) {
    PyObject *kw = Py_BuildValue("{si}", "fileno", fd);
    if (!kw) return NULL;
    PyObject *empty = PyTuple_New(0);
    PyObject *sock = empty ? PyObject_Call(aem_socket_type, empty, kw) : NULL;
    Py_XDECREF(empty);
    Py_DECREF(kw);
    if (!sock) return NULL;
    PyObject *r = PyObject_CallMethod(sock, "setblocking", "O", Py_True);
    if (!r) {
        PyObject *d = PyObject_CallMethod(sock, "detach", NULL);  /* give the fd back untouched */
        Py_XDECREF(d);
        Py_DECREF(sock);
        return NULL;
    }
    Py_DECREF(r);
    return sock;
}

PyObject *aem_handoff_parse(const char *buf, size_t len, const int *fds, int nfds, PyObject *sources) {
    aem_ho_header h;
    if (len < sizeof h) return bad("too short");
    memcpy(&h, buf, sizeof h);
    if (h.magic != AEM_HO_MAGIC) return bad("bad magic");
    if (h.version != AEM_HO_VERSION) return bad("unknown version");
    if (h.op != AEM_HO_RUN && h.op != AEM_HO_KEEP) return bad("bad op");
    if (h.data_len > AEM_HO_MAX_DATA || (size_t)h.data_len != len - sizeof h) return bad("bad data length");
    if (h.flags & ~(AEM_HO_P_INT | AEM_HO_P_BYTES | AEM_HO_HAS_FD | AEM_HO_RC | AEM_HO_JOB | AEM_HO_TEXT))
        return bad("unknown flags");
    if (nfds != ((h.flags & AEM_HO_HAS_FD) ? 1 : 0)) return bad("fd count does not match");
    const char *data = buf + sizeof h;
    size_t dlen = h.data_len;
    int with_fd = 0, text = (h.flags & AEM_HO_TEXT) != 0;
    unsigned allowed = 0;  /* flags this kind may carry */
    switch (h.kind) {
    case AEM_K_USER:
        allowed = AEM_HO_P_INT | AEM_HO_P_BYTES;
        if ((h.flags & AEM_HO_P_INT) && (h.flags & AEM_HO_P_BYTES)) return bad("two payloads");
        if (dlen && !(h.flags & AEM_HO_P_BYTES)) return bad("data without a bytes payload");
        break;
    case AEM_K_TIMER: case AEM_K_SIGNAL:
        if (dlen) return bad("unexpected data");
        break;
    case AEM_K_READABLE: case AEM_K_WRITABLE: case AEM_K_ACCEPT:
        if (dlen) return bad("unexpected data");
        /* fall through */
    case AEM_K_READ:
        allowed = AEM_HO_HAS_FD;
        with_fd = 1;
        if (!(h.flags & AEM_HO_HAS_FD)) return bad("missing fd");
        break;
    case AEM_K_CHILD: case AEM_K_JOB:
        allowed = AEM_HO_RC | AEM_HO_JOB | AEM_HO_TEXT;
        if (dlen && !text) return bad("data without text");
        break;
    case AEM_K_FILE:
        allowed = AEM_HO_TEXT;
        if (dlen && !text) return bad("data without text");
        break;
    default:
        return bad("unsupported kind");
    }
    if (h.flags & ~allowed) return bad("flags not of this kind");
    if (with_fd && fds[0] < 0) return bad("bad fd");

    PyObject *source = NULL;
    if (sources && sources != Py_None) {
        if (!PyDict_Check(sources)) {
            PyErr_SetString(PyExc_TypeError, "sources must be a dict or None");
            return NULL;
        }
        PyObject *key = PyLong_FromUnsignedLongLong(h.eid);
        if (!key) return NULL;
        source = PyDict_GetItemWithError(sources, key);  /* borrowed */
        Py_DECREF(key);
        if (!source && PyErr_Occurred()) return NULL;
    }
    EventObject *ev = aem_event_new(h.kind, h.eid, h.time_ns, source);
    if (!ev) return NULL;
    ev->a = h.a;
    ev->b = h.b;
    PyObject **o = ev->o;
    switch (h.kind) {
    case AEM_K_USER:
        if (h.flags & AEM_HO_P_INT) o[0] = PyLong_FromLongLong((long long)h.i0);
        else if (h.flags & AEM_HO_P_BYTES) o[0] = PyBytes_FromStringAndSize(data, (Py_ssize_t)dlen);
        else o[0] = Py_NewRef(Py_None);
        if (!o[0]) goto fail;
        break;
    case AEM_K_TIMER:
        ev->t_after = h.i0;
        ev->t_interval = h.i1;
        break;
    case AEM_K_READABLE: case AEM_K_WRITABLE:
        ev->b = (uint64_t)(int64_t)fds[0];  /* the capsule's own fd */
        break;
    case AEM_K_READ:
        ev->a = h.a != 0;
        ev->b = (uint64_t)(int64_t)fds[0];
        if (!(o[0] = PyBytes_FromStringAndSize(data, (Py_ssize_t)dlen))) goto fail;
        break;
    case AEM_K_ACCEPT: {
        ev->b = 0;
        if (!(o[0] = socket_on(fds[0]))) goto fail;
        o[1] = PyObject_CallMethod(o[0], "getpeername", NULL);
        if (!o[1]) {  /* the peer may already be gone: no address, not an error */
            PyErr_Clear();
            o[1] = Py_NewRef(Py_None);
        }
        break;
    }
    case AEM_K_CHILD: case AEM_K_JOB:
        o[0] = PyLong_FromLongLong((long long)h.i0);
        o[1] = int_or_none(h.flags & AEM_HO_RC, h.i1);
        o[2] = int_or_none(h.flags & AEM_HO_JOB, h.i2);
        o[3] = text_or_none(text, data, dlen);
        if (!o[0] || !o[1] || !o[2] || !o[3]) goto fail;
        break;
    case AEM_K_FILE:
        if (!(o[0] = text_or_none(text, data, dlen))) goto fail;
        break;
    }
    return Py_BuildValue("(iKN)", (int)h.op, (unsigned long long)h.eid, (PyObject *)ev);
fail:
    if (h.kind == AEM_K_ACCEPT && o[0]) {  /* hand the fd back: the caller closes it */
        PyObject *d = PyObject_CallMethod(o[0], "detach", NULL);
        Py_XDECREF(d);
    }
    Py_DECREF(ev);
    return NULL;
}

static int fd_list(PyObject *list, int *fds, int max) {
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "fds must be a list of ints");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n > max) {
        PyErr_SetString(PyExc_ValueError, "too many fds");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyList_GET_ITEM(list, i));
        if (v == -1 && PyErr_Occurred()) return -1;
        fds[i] = (int)v;
    }
    return (int)n;
}

static PyObject *handoff_parse_py(PyObject *mod, PyObject *args) {
    Py_buffer data;
    PyObject *list, *sources = Py_None;
    if (!PyArg_ParseTuple(args, "y*O|O:_handoff_parse", &data, &list, &sources)) return NULL;
    int fds[HO_FDS_MAX];
    int nfds = fd_list(list, fds, HO_FDS_MAX);
    PyObject *r = nfds < 0 ? NULL : aem_handoff_parse(data.buf, (size_t)data.len, fds, nfds, sources);
    PyBuffer_Release(&data);
    return r;
}

/* ---- receiving (capsule) ------------------------------------------------------ */

static char *recv_buf;  /* made, and every page touched, on first use (the capsule's warm-up) */

/* One message on sockfd: None (end of stream), (op, eid, event) for a native record,
 * (0, data, fds) for anything else. */
static PyObject *recv_one(int sockfd, PyObject *sources, int spin_us) {
    if (!recv_buf) {
        recv_buf = PyMem_RawMalloc(HO_BUF);
        if (!recv_buf) return PyErr_NoMemory();
        memset(recv_buf, 0, HO_BUF);
    }
    union {
        char buf[CMSG_SPACE(HO_FDS_MAX * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {recv_buf, HO_BUF};
    struct msghdr msg;
    ssize_t n;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        Py_BEGIN_ALLOW_THREADS
        if (spin_us > 0) {  /* the next message may be on its way: no sleep, no wake-up */
            aem_spin_readable(sockfd, spin_us);
            spin_us = 0;
        }
        n = recvmsg(sockfd, &msg, MSG_CMSG_CLOEXEC);
        Py_END_ALLOW_THREADS
        if (n >= 0) break;
        if (errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0) return NULL;
    }
    int fds[HO_FDS_MAX];
    int nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k && nfds < HO_FDS_MAX; i++) memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (n == 0 && nfds == 0) Py_RETURN_NONE;  /* end of stream */
    if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        return bad("truncated message");
    }
    uint32_t magic = 0;
    if ((size_t)n >= sizeof magic) memcpy(&magic, recv_buf, sizeof magic);
    if (magic == AEM_HO_MAGIC) {
        PyObject *r = aem_handoff_parse(recv_buf, (size_t)n, fds, nfds, sources);
        if (!r) {
            for (int i = 0; i < nfds; i++) close(fds[i]);
        }
        return r;
    }
    PyObject *list = PyList_New(nfds);
    if (!list) goto fail;
    for (int i = 0; i < nfds; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (!v) {
            Py_DECREF(list);
            goto fail;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return Py_BuildValue("(iy#N)", 0, recv_buf, (Py_ssize_t)n, list);
fail:
    for (int i = 0; i < nfds; i++) close(fds[i]);
    return NULL;
}

static PyObject *handoff_recv(PyObject *mod, PyObject *args) {
    int sockfd;
    PyObject *sources = Py_None;
    if (!PyArg_ParseTuple(args, "i|O:handoff_recv", &sockfd, &sources)) return NULL;
    return recv_one(sockfd, sources, 0);
}

/* After a keepalive handler that returned: the capsule's copy of the event's fd is
 * closed unless the handler kept it (a CloseEvent's fd is not ours). */
static void release_native(PyObject *event) {
    if (((EventObject *)event)->kept || ((EventObject *)event)->kind == AEM_K_CLOSE) return;
    PyObject *fd = PyObject_GetAttrString(event, "fd");
    if (!fd) {
        PyErr_Clear();
        return;
    }
    if (PyLong_CheckExact(fd)) {
        long v = PyLong_AsLong(fd);
        if (v >= 0 && v <= INT_MAX) close((int)v);
    }
    PyErr_Clear();
    Py_DECREF(fd);
}

/* The capsule's receive loop: native records whose handler is in table run here, with
 * no Python between recvmsg and the handler's first line; a keepalive event whose
 * handler returned is released here and the loop goes on.  Anything else goes back
 * to the caller: None (end of stream), (0, data, fds) (a pickled message), or
 * (op, eid, event, exc) for a native event the caller finishes (releases it, reports,
 * exits after a run): its handler ran and raised exc (None: it returned, op is run),
 * or the table has no handler for eid (exc None, the handler never ran).  With spin_us
 * (an executor's worker that just answered), the first wait polls for that long before
 * it sleeps (see aem_spin_readable). */
static PyObject *capsule_serve(PyObject *mod, PyObject *args) {
    int sockfd, spin_us = 0;
    PyObject *table, *sources;
    if (!PyArg_ParseTuple(args, "iO!O|i:capsule_serve", &sockfd, &PyDict_Type, &table, &sources, &spin_us))
        return NULL;
    for (;;) {
        PyObject *got = recv_one(sockfd, sources, spin_us);
        spin_us = 0;
        if (!got || got == Py_None || PyTuple_GET_SIZE(got) != 3 || PyLong_AsLong(PyTuple_GET_ITEM(got, 0)) == 0)
            return got;
        PyObject *op = PyTuple_GET_ITEM(got, 0), *eid = PyTuple_GET_ITEM(got, 1), *event = PyTuple_GET_ITEM(got, 2);
        PyObject *handler = PyDict_GetItemWithError(table, eid);  /* borrowed */
        PyObject *exc = NULL;
        if (handler) {
            Py_INCREF(handler);
            PyObject *r = PyObject_CallOneArg(handler, event);
            Py_DECREF(handler);
            if (r) {
                Py_DECREF(r);
                if (PyLong_AsLong(op) == AEM_HO_KEEP) {
                    release_native(event);
                    Py_DECREF(got);
                    continue;
                }
            } else {
                PyObject *type, *tb;
                PyErr_Fetch(&type, &exc, &tb);
                PyErr_NormalizeException(&type, &exc, &tb);
                if (tb && exc) PyException_SetTraceback(exc, tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
            }
        } else if (PyErr_Occurred()) {
            Py_DECREF(got);
            return NULL;
        }
        PyObject *res = Py_BuildValue("(OOON)", op, eid, event, exc ? exc : Py_NewRef(Py_None));
        Py_DECREF(got);
        return res;
    }
}

/* ---- the idle table (parent): the engine hands events to capsules itself ------- */

/* A pool's idle warm capsules, as the engine's delivery path sees them.  The pool
 * (Python, its own lock) pushes a capsule's socket when the capsule reports ready
 * and removes it when it takes it itself; the engine takes the newest one (lifo) for a
 * native occurrence (aem_handoff_deliver) and records the take, which the pool applies
 * later (drain).  Every operation runs with the GIL held and without releasing it, so a
 * capsule is taken once: either remove() returns True or the take is in the queue.
 * Keepalive registrations: the pool attaches a capsule (its Python path, first
 * occurrence) and publishes it here (attach); the engine sends the next occurrences to
 * it and counts them (kept); a send that fails detaches it (the pool's path then queues
 * the occurrence or reports it); the pool detaches it while it holds a backlog for it. */
typedef struct {
    int fd;
    unsigned long long token;
} ho_idle;

typedef struct {
    unsigned long long token, eid;
    int flags, err;
} ho_take;

typedef struct {
    unsigned long long eid;
    int fd;
} ho_attached;  /* a keepalive registration's attached capsule */

typedef struct {
    PyObject_HEAD
    ho_idle *idle;
    Py_ssize_t nidle, idle_cap;
    ho_take *takes;
    Py_ssize_t ntakes, takes_cap;
    ho_attached *attached;
    Py_ssize_t nattached, attached_cap;
    long long kept;  /* keepalive occurrences sent to attached capsules since the pool last looked */
    PyObject *known;  /* frozenset of the eids the capsules' template knows, or NULL */
    int open, reserve, reserve_priority;
    int lifo;  /* nonzero (the default): take the newest idle capsule, else the oldest */
    int wake_fd, low_water;  /* a take that leaves low_water or fewer idle writes a byte to wake_fd */
    pid_t pid;
} HandoffTable;

static PyTypeObject HandoffTable_Type;
static PyObject *default_table;  /* the default pool's (pool=None), or NULL */

static int grow(void **arr, Py_ssize_t *cap, Py_ssize_t need, size_t item) {
    if (need <= *cap) return 0;
    Py_ssize_t n = *cap ? *cap * 2 : 16;
    while (n < need) n *= 2;
    void *p = PyMem_Realloc(*arr, (size_t)n * item);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    *arr = p;
    *cap = n;
    return 0;
}

static int table_init(HandoffTable *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"reserve", "reserve_priority", NULL};
    int reserve = 0, prio = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii:HandoffTable", kwlist, &reserve, &prio)) return -1;
    self->reserve = reserve;
    self->reserve_priority = prio;
    self->lifo = 1;
    self->wake_fd = -1;
    self->pid = getpid();
    return 0;
}

static void table_dealloc(HandoffTable *self) {
    PyMem_Free(self->idle);
    PyMem_Free(self->takes);
    PyMem_Free(self->attached);
    Py_XDECREF(self->known);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *table_push(HandoffTable *self, PyObject *args) {
    int fd;
    unsigned long long token;
    if (!PyArg_ParseTuple(args, "iK:push", &fd, &token)) return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
        return NULL;
    }
    if (grow((void **)&self->idle, &self->idle_cap, self->nidle + 1, sizeof(ho_idle)) < 0) return NULL;
    self->idle[self->nidle++] = (ho_idle){fd, token};
    Py_RETURN_NONE;
}

static void idle_drop(HandoffTable *self, Py_ssize_t i) {
    memmove(&self->idle[i], &self->idle[i + 1], (size_t)(self->nidle - i - 1) * sizeof(ho_idle));
    self->nidle--;
}

static PyObject *table_remove(HandoffTable *self, PyObject *arg) {
    unsigned long long token = PyLong_AsUnsignedLongLong(arg);
    if (token == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    for (Py_ssize_t i = 0; i < self->nidle; i++) {
        if (self->idle[i].token == token) {
            idle_drop(self, i);
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static ho_attached *find_attached(HandoffTable *self, unsigned long long eid) {
    for (Py_ssize_t i = 0; i < self->nattached; i++)
        if (self->attached[i].eid == eid) return &self->attached[i];
    return NULL;
}

static void attached_drop(HandoffTable *self, ho_attached *a) {
    *a = self->attached[--self->nattached];
}

static PyObject *table_attach(HandoffTable *self, PyObject *args) {
    unsigned long long eid;
    int fd;
    if (!PyArg_ParseTuple(args, "Ki:attach", &eid, &fd)) return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
        return NULL;
    }
    ho_attached *a = find_attached(self, eid);
    if (!a) {
        if (grow((void **)&self->attached, &self->attached_cap, self->nattached + 1, sizeof(ho_attached)) < 0)
            return NULL;
        a = &self->attached[self->nattached++];
    }
    *a = (ho_attached){eid, fd};
    Py_RETURN_NONE;
}

static PyObject *table_detach(HandoffTable *self, PyObject *arg) {
    unsigned long long eid = PyLong_AsUnsignedLongLong(arg);
    if (eid == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    ho_attached *a = find_attached(self, eid);
    if (!a) Py_RETURN_FALSE;
    attached_drop(self, a);
    Py_RETURN_TRUE;
}

static PyObject *table_clear(HandoffTable *self, PyObject *unused) {
    self->nidle = 0;
    Py_RETURN_NONE;
}

static PyObject *table_drain(HandoffTable *self, PyObject *unused) {
    PyObject *list = PyList_New(self->ntakes);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < self->ntakes; i++) {
        ho_take *t = &self->takes[i];
        PyObject *item = Py_BuildValue("(KKii)", t->token, t->eid, t->flags, t->err);
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    self->ntakes = 0;
    return list;
}

static PyObject *table_set_known(HandoffTable *self, PyObject *arg) {
    if (arg != Py_None && !PyFrozenSet_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "known must be a frozenset of event ids or None");
        return NULL;
    }
    Py_XSETREF(self->known, arg == Py_None ? NULL : Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *table_get_idle(HandoffTable *self, void *closure) { return PyLong_FromSsize_t(self->nidle); }

static PyObject *table_get_attached(HandoffTable *self, void *closure) {
    return PyLong_FromSsize_t(self->nattached);
}

static PyObject *set_default(PyObject *mod, PyObject *arg) {
    if (arg != Py_None && !PyObject_TypeCheck(arg, &HandoffTable_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected a HandoffTable or None");
        return NULL;
    }
    Py_XSETREF(default_table, arg == Py_None ? NULL : Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *get_default(PyObject *mod, PyObject *unused) {
    return Py_NewRef(default_table ? default_table : Py_None);
}

static PyMethodDef table_methods[] = {
    {"push", (PyCFunction)table_push, METH_VARARGS, "push(fd, token): an idle capsule's socket, newest last."},
    {"remove", (PyCFunction)table_remove, METH_O, "remove(token) -> True if it was idle here (False: the engine took it)."},
    {"clear", (PyCFunction)table_clear, METH_NOARGS, "clear(): no capsule is idle here any more."},
    {"attach", (PyCFunction)table_attach, METH_VARARGS,
     "attach(eid, fd): the engine sends keepalive occurrences of eid to the capsule on fd itself."},
    {"detach", (PyCFunction)table_detach, METH_O,
     "detach(eid) -> True if eid was attached here: its occurrences take the pool's Python path."},
    {"drain", (PyCFunction)table_drain, METH_NOARGS,
     "drain() -> [(token, eid, flags, errno)]: the capsules the engine took since the last drain "
     "(errno 0: the event was sent; else the send failed and the event took the Python path)."},
    {"set_known", (PyCFunction)table_set_known, METH_O, "set_known(frozenset | None): eids the idle capsules' template knows."},
    {NULL},
};

static PyMemberDef table_members[] = {
    {"open", T_INT, offsetof(HandoffTable, open), 0, "nonzero: the engine may take capsules (nothing waits in the pool)"},
    {"reserve", T_INT, offsetof(HandoffTable, reserve), 0, "idle capsules kept for priority >= reserve_priority"},
    {"reserve_priority", T_INT, offsetof(HandoffTable, reserve_priority), 0, NULL},
    {"kept", T_LONGLONG, offsetof(HandoffTable, kept), 0,
     "keepalive occurrences the engine sent to attached capsules (the pool counts and resets it)"},
    {"lifo", T_INT, offsetof(HandoffTable, lifo), 0,
     "nonzero (default): the newest idle capsule takes the next event (the shortest sleep, the "
     "warmest caches); 0: the oldest (kept to measure one against the other)"},
    {"wake_fd", T_INT, offsetof(HandoffTable, wake_fd), 0,
     "a non-blocking pipe's write end (-1: none): a take by the engine that leaves low_water or "
     "fewer capsules idle writes a byte to it (the pool's manager wakes up and refills)"},
    {"low_water", T_INT, offsetof(HandoffTable, low_water), 0, "see wake_fd"},
    {NULL},
};

static PyGetSetDef table_getset[] = {
    {"idle", (getter)table_get_idle, NULL, "how many capsules are idle here", NULL},
    {"attached", (getter)table_get_attached, NULL, "how many keepalive registrations are attached here", NULL},
    {NULL},
};

static PyTypeObject HandoffTable_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aem._core.HandoffTable",
    .tp_basicsize = sizeof(HandoffTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HandoffTable(reserve, reserve_priority): a pool's idle capsules, for the engine's delivery path.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_members = table_members,
    .tp_getset = table_getset,
};

static int record_take(HandoffTable *tbl, const ho_idle *cap, uint64_t eid, int flags, int err) {
    if (grow((void **)&tbl->takes, &tbl->takes_cap, tbl->ntakes + 1, sizeof(ho_take)) < 0) return -1;
    tbl->takes[tbl->ntakes++] = (ho_take){cap->token, eid, flags, err};
    return 0;
}

/* 1: Read data the record may carry (bytes, or a block of a vmtable that is not a VZONE:
 * a VZONE block travels by reference on the pickled path). */
static int read_payload_native(EventObject *ev) {
    PyObject *d = ev->o[0];
    if (!d || PyBytes_CheckExact(d)) return 1;
    PyObject *vmt = PyObject_GetAttrString(d, "vmtable");
    PyObject *zone = vmt ? PyObject_GetAttrString(vmt, "zone") : NULL;
    long z = zone ? PyLong_AsLong(zone) : -1;
    Py_XDECREF(zone);
    Py_XDECREF(vmt);
    PyErr_Clear();
    return z == AEM_VMT_UZONE;
}

/* A record (and its fd when fd >= 0) onto a capsule's socket, without blocking: 0 or an errno. */
static int send_record(int sock, const ho_parts *p, int fd) {
    struct iovec iov[2] = {{(void *)&p->h, sizeof p->h}, {(void *)p->data, (size_t)p->dlen}};
    return sendmsg_fd(sock, iov, p->dlen ? 2 : 1, fd, MSG_NOSIGNAL | MSG_DONTWAIT);
}

int aem_handoff_deliver(PyObject *pool, uint64_t eid, int flags, int priority, EventObject *ev) {
    static PyObject *table_name;
    if (flags & AEM_F_FORK) return 0;
    PyObject *obj;
    if (pool == NULL || pool == Py_None) {
        obj = Py_XNewRef(default_table);
    } else {
        if (!table_name && !(table_name = PyUnicode_InternFromString("_table"))) return -1;
        obj = PyObject_GetAttr(pool, table_name);
        if (!obj) {
            PyErr_Clear();
            return 0;
        }
    }
    int sent = 0, keep = (flags & AEM_F_KEEPALIVE) != 0;
    if (!obj || !PyObject_TypeCheck(obj, &HandoffTable_Type)) goto out;
    HandoffTable *tbl = (HandoffTable *)obj;
    if (!tbl->open || tbl->pid != getpid()) goto out;
    ho_attached *att = NULL;
    if (keep) {  /* to its attached capsule; the first occurrence attaches one (the pool's path) */
        if (!(att = find_attached(tbl, eid))) goto out;
    } else {
        if (tbl->nidle == 0 || !tbl->known) goto out;
        if (priority < tbl->reserve_priority && tbl->nidle <= tbl->reserve) goto out;
        PyObject *key = PyLong_FromUnsignedLongLong(eid);
        if (!key) {
            sent = -1;
            goto out;
        }
        int known = PySet_Contains(tbl->known, key);
        Py_DECREF(key);
        if (known < 0) sent = -1;
        if (known <= 0) goto out;
    }
    if (ev->kind == AEM_K_READ && !read_payload_native(ev)) goto out;
    ho_parts p;
    if (!encode_parts(ev, keep ? AEM_HO_KEEP : AEM_HO_RUN, &p)) goto out;
    int fd = -1;
    if (p.h.flags & AEM_HO_HAS_FD) {  /* the kernel gives the capsule its own copy */
        fd = p.fdobj ? PyObject_AsFileDescriptor(p.fdobj) : (int)(int64_t)ev->b;
        if (fd < 0) {
            PyErr_Clear();
            if (p.view.obj) PyBuffer_Release(&p.view);
            goto out;
        }
    }
    int err;
    if (keep) {
        err = send_record(att->fd, &p, fd);
        if (err) attached_drop(tbl, att);  /* full or gone: the pool's path queues or reports it */
        else tbl->kept++;
    } else {
        Py_ssize_t at = tbl->lifo ? tbl->nidle - 1 : 0;
        ho_idle cap = tbl->idle[at];
        err = send_record(cap.fd, &p, fd);
        idle_drop(tbl, at);  /* sent, or broken: either way the pool decides what it is now */
        if (record_take(tbl, &cap, eid, flags, err) < 0) err = -1;
        if (tbl->wake_fd >= 0 && tbl->nidle <= tbl->low_water) {  /* the pool runs low: refill */
            ssize_t w = write(tbl->wake_fd, "t", 1);
            (void)w;  /* a full pipe already holds a wake-up */
        }
    }
    if (p.view.obj) PyBuffer_Release(&p.view);
    if (err < 0) {
        sent = -1;
        goto out;
    }
    sent = err == 0;  /* a failed send: the event takes the Python path (another capsule) */
    if (sent && p.fdobj && p.fdobj != Py_None) {  /* a socket (conn) is the capsule's now */
        PyObject *r = PyObject_CallMethod(p.fdobj, "close", NULL);
        if (!r) PyErr_Clear();
        Py_XDECREF(r);
    }
out:
    Py_XDECREF(obj);
    return sent;
}

static PyMethodDef handoff_methods[] = {
    {"handoff_encode", handoff_encode, METH_VARARGS,
     "handoff_encode(event, op) -> (record, fd object) or None\n\n"
     "The event as a native capsule record (op 1: run, 2: keep), with what travels as an fd "
     "(the socket, the fd number, or None); None if the event needs the pickled path."},
    {"handoff_send", handoff_send, METH_VARARGS,
     "handoff_send(sockfd, record, fd=-1)\n\nSend a record on a capsule socket, fd in SCM_RIGHTS."},
    {"handoff_recv", handoff_recv, METH_VARARGS,
     "handoff_recv(sockfd, sources=None) -> None | (op, eid, event) | (0, data, fds)\n\n"
     "Receive one message: a native record rebuilt as an event, or the raw message."},
    {"capsule_serve", capsule_serve, METH_VARARGS,
     "capsule_serve(sockfd, table, sources, spin_us=0) -> None | (0, data, fds) | (op, eid, event, exc)\n\n"
     "The capsule's receive loop: runs native events whose handler is in table; returns the rest. "
     "spin_us: poll that long before the first wait sleeps."},
    {"handoff_set_default", set_default, METH_O,
     "handoff_set_default(table | None)\n\nThe idle table the engine uses for EVF_CAPSULE registrations without pool=."},
    {"handoff_default", get_default, METH_NOARGS,
     "handoff_default() -> HandoffTable | None\n\nThe idle table set by handoff_set_default()."},
    {"_handoff_parse", handoff_parse_py, METH_VARARGS,
     "_handoff_parse(data, fds, sources=None) -> (op, eid, event)\n\nParse one record (tests)."},
    {NULL},
};

int aem_handoff_init(PyObject *module) {
    if (PyModule_AddFunctions(module, handoff_methods) < 0) return -1;
    if (PyType_Ready(&HandoffTable_Type) < 0) return -1;
    if (PyModule_AddObjectRef(module, "HandoffTable", (PyObject *)&HandoffTable_Type) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HANDOFF_RUN", AEM_HO_RUN) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HANDOFF_KEEP", AEM_HO_KEEP) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HANDOFF_HEADER", sizeof(aem_ho_header)) < 0) return -1;
    return aem_calls_init(module);
}
