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

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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
    if (ev->dict && PyDict_GET_SIZE(ev->dict) > 0) Py_RETURN_NONE;  /* a constructor's data: pickled */
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
            Py_RETURN_NONE;
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
        if (!o[0] || o[0] == Py_None) Py_RETURN_NONE;
        h.flags |= AEM_HO_HAS_FD;
        fdobj = o[0];
        break;
    case AEM_K_READ:
        if (!o[0] || o[0] == Py_None) Py_RETURN_NONE;
        if (PyObject_GetBuffer(o[0], &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (view.len > AEM_HO_MAX_DATA) {
            PyBuffer_Release(&view);
            Py_RETURN_NONE;
        }
        data = view.buf;
        dlen = view.len;
        h.flags |= AEM_HO_HAS_FD;
        fdobj = NULL;
        break;
    case AEM_K_CHILD:
    case AEM_K_JOB:
        if (!o[0] || !fits_i64(o[0], &h.i0)) Py_RETURN_NONE;
        if (o[1] && o[1] != Py_None) {
            if (!fits_i64(o[1], &h.i1)) Py_RETURN_NONE;
            h.flags |= AEM_HO_RC;
        }
        if (o[2] && o[2] != Py_None) {
            if (!fits_i64(o[2], &h.i2)) Py_RETURN_NONE;
            h.flags |= AEM_HO_JOB;
        }
        if (!text_of(o[3], &data, &dlen) || dlen > AEM_HO_MAX_DATA) Py_RETURN_NONE;
        if (data) h.flags |= AEM_HO_TEXT;
        break;
    case AEM_K_FILE:
        if (!text_of(o[0], &data, &dlen) || dlen > AEM_HO_MAX_DATA) Py_RETURN_NONE;
        if (data) h.flags |= AEM_HO_TEXT;
        break;
    default:
        Py_RETURN_NONE;  /* Close, pressure, custom, hosted: the pickled path */
    }
    h.data_len = (uint32_t)dlen;
    PyObject *rec = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof h + dlen);
    if (rec) {
        memcpy(PyBytes_AS_STRING(rec), &h, sizeof h);
        if (dlen) memcpy(PyBytes_AS_STRING(rec) + sizeof h, data, (size_t)dlen);
    }
    if (view.obj) PyBuffer_Release(&view);
    if (!rec) return NULL;
    PyObject *fd = fdobj ? Py_NewRef(fdobj) : PyLong_FromUnsignedLongLong(ev->b);
    if (!fd) {
        Py_DECREF(rec);
        return NULL;
    }
    return Py_BuildValue("(NN)", rec, fd);
}

static PyObject *handoff_send(PyObject *mod, PyObject *args) {
    int sockfd, fd = -1;
    Py_buffer rec;
    if (!PyArg_ParseTuple(args, "iy*|i:handoff_send", &sockfd, &rec, &fd)) return NULL;
    struct iovec iov = {rec.buf, (size_t)rec.len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
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
    ssize_t n = sendmsg(sockfd, &msg, MSG_NOSIGNAL);
    PyBuffer_Release(&rec);
    if (n < 0) return PyErr_SetFromErrno(PyExc_OSError);
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

static PyObject *handoff_recv(PyObject *mod, PyObject *args) {
    int sockfd;
    PyObject *sources = Py_None;
    if (!PyArg_ParseTuple(args, "i|O:handoff_recv", &sockfd, &sources)) return NULL;
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
    {"_handoff_parse", handoff_parse_py, METH_VARARGS,
     "_handoff_parse(data, fds, sources=None) -> (op, eid, event)\n\nParse one record (tests)."},
    {NULL},
};

int aem_handoff_init(PyObject *module) {
    if (PyModule_AddFunctions(module, handoff_methods) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HANDOFF_RUN", AEM_HO_RUN) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HANDOFF_KEEP", AEM_HO_KEEP) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HANDOFF_HEADER", sizeof(aem_ho_header)) < 0) return -1;
    return 0;
}
