/* loop_stream.c — aem._core.StreamIO: the hot paths of aem.EventLoop's stream transport.
 *
 * aem.loop.transports.SocketTransport is asyncio's _SelectorSocketTransport; its
 * StreamIO does, in C, what runs for every message:
 *
 *   read_ready()  the socket is readable: one recv() into the loop's shared buffer,
 *                 the bytes (exact size) to protocol.data_received
 *   write(data)   keep the data until the end of the loop turn (the first write of a
 *                 turn as is, later ones appended to the transport's bytearray buffer)
 *   flush         (end of the turn, from loop.c) one send() or sendmsg() (writev) of
 *                 everything written during the turn
 *
 * The transport's state stays in its Python attributes (_conn_lost, _buffer, _eof ...),
 * read here by name, so asyncio's own methods (close, abort, write_eof, flow control,
 * sendfile) keep working on it.  Everything uncommon — errors, EOF, buffered protocols,
 * a socket that would block, flow control, closing — is handed to the transport's Python
 * methods (the names asyncio uses, or _aem_* ones in aem.loop.transports).
 *
 * Errors: functions return 0 or -1 with a Python exception set.
 */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

typedef struct {
    PyObject_HEAD
    PyObject *core;       /* the loop's LoopCore */
    PyObject *transport;  /* the SocketTransport */
    PyObject *dict;       /* the transport's __dict__, where its state is read (or NULL) */
    PyObject *first;      /* the first write of this turn, not yet sent (bytes), or NULL */
    int fd;
    int flush_queued;
    int buffered;         /* the protocol is a BufferedProtocol: reads go through Python */
} StreamIOObject;

static PyTypeObject *StreamIO_Type;
static PyObject *s_conn_lost, *s_buffer, *s_eof, *s_empty_waiter, *s_high_water, *s_protocol,
    *s_data_received, *s_fatal_error, *s_on_eof, *s_read_ready_cb, *s_write_lost, *s_maybe_pause,
    *s_flush_failed, *s_flush_partial, *s_flush_done, *s_protocol_paused, *s_closing,
    *m_read_error, *m_proto_error;

/* transport.<name> (a new reference): asyncio's transport state is in instance attributes, read
 * straight from the transport's __dict__ (a third of the cost of getattr(), which first looks
 * the name up along the class's MRO); a name not there is looked up by getattr(). */
static PyObject *tattr(StreamIOObject *io, PyObject *name) {
    if (io->dict) {
        PyObject *v = PyDict_GetItemWithError(io->dict, name);
        if (v) return Py_NewRef(v);
        if (PyErr_Occurred()) return NULL;
    }
    return PyObject_GetAttr(io->transport, name);
}

/* transport.<name> is true? 1/0, -1 on error. */
static int attr_true(StreamIOObject *io, PyObject *name) {
    PyObject *v = tattr(io, name);
    if (!v) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static int attr_not_none(StreamIOObject *io, PyObject *name) {
    PyObject *v = tattr(io, name);
    if (!v) return -1;
    int r = v != Py_None;
    Py_DECREF(v);
    return r;
}

static PyObject *call_method0(PyObject *t, PyObject *name) { return PyObject_CallMethodNoArgs(t, name); }

/* The pending exception went to transport._fatal_error(exc, message), unless it is a
 * SystemExit or KeyboardInterrupt (those propagate, as in asyncio). */
static PyObject *to_fatal_error(PyObject *t, PyObject *message) {
    if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return NULL;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb && exc) PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (!exc) exc = Py_NewRef(Py_None);
    PyObject *r = PyObject_CallMethodObjArgs(t, s_fatal_error, exc, message, NULL);
    Py_DECREF(exc);
    return r;
}

/* ---- reading -------------------------------------------------------------------------------------- */

static PyObject *io_read_ready(StreamIOObject *io, PyObject *unused) {
    PyObject *t = io->transport;
    if (!t) Py_RETURN_NONE;
    if (io->buffered) {
        PyObject *cb = PyObject_GetAttr(t, s_read_ready_cb);
        if (!cb) return NULL;
        PyObject *r = PyObject_CallNoArgs(cb);
        Py_DECREF(cb);
        return r;
    }
    int lost = attr_true(io, s_conn_lost);
    if (lost) return lost < 0 ? NULL : Py_NewRef(Py_None);
    size_t cap;
    char *buf = aem_loop_recv_buffer(&cap);
    if (!buf) return NULL;
    ssize_t n;
    do {
        n = recv(io->fd, buf, cap, 0);
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    if (n < 0) {
        if (PyErr_Occurred()) return NULL;
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        PyErr_SetFromErrno(PyExc_OSError);
        return to_fatal_error(t, m_read_error);
    }
    if (n == 0) return call_method0(t, s_on_eof);
    PyObject *data = PyBytes_FromStringAndSize(buf, n);
    if (!data) return NULL;
    PyObject *proto = tattr(io, s_protocol);
    if (!proto) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *r = PyObject_CallMethodOneArg(proto, s_data_received, data);
    Py_DECREF(proto);
    Py_DECREF(data);
    if (!r) return to_fatal_error(t, m_proto_error);
    return r;
}

/* ---- writing ---------------------------------------------------------------------------------------- */

static Py_ssize_t first_size(StreamIOObject *io) { return io->first ? PyBytes_GET_SIZE(io->first) : 0; }

static PyObject *io_write(StreamIOObject *io, PyObject *data) {
    PyObject *t = io->transport;
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data)) {
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%.200s'",
                     Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (!t) {
        PyErr_SetString(PyExc_RuntimeError, "the transport is gone");
        return NULL;
    }
    int r = attr_true(io, s_eof);
    if (r) {
        if (r > 0) PyErr_SetString(PyExc_RuntimeError, "Cannot call write() after write_eof()");
        return NULL;
    }
    r = attr_not_none(io, s_empty_waiter);
    if (r) {
        if (r > 0) PyErr_SetString(PyExc_RuntimeError, "unable to write; sendfile is in progress");
        return NULL;
    }
    Py_ssize_t len = PyObject_Length(data);
    if (len < 0) return NULL;
    if (len == 0) Py_RETURN_NONE;
    r = attr_true(io, s_conn_lost);
    if (r) return r < 0 ? NULL : PyObject_CallMethodOneArg(t, s_write_lost, data);
    PyObject *buffer = tattr(io, s_buffer);
    if (!buffer) return NULL;
    Py_ssize_t blen = PyObject_Length(buffer);
    if (blen < 0) goto fail;
    if (blen || io->first) {
        PyObject *b = PySequence_InPlaceConcat(buffer, data);
        if (!b) goto fail;
        Py_DECREF(b);
        blen += len;
    } else {
        io->first = PyBytes_CheckExact(data) ? Py_NewRef(data) : PyBytes_FromObject(data);
        if (!io->first) goto fail;
        if (!io->flush_queued) {
            if (aem_loop_flush_later(io->core, (PyObject *)io) < 0) goto fail;
            io->flush_queued = 1;
        }
    }
    Py_DECREF(buffer);
    PyObject *hw = tattr(io, s_high_water);
    if (!hw) return NULL;
    Py_ssize_t high = PyLong_AsSsize_t(hw);
    Py_DECREF(hw);
    if (high == -1 && PyErr_Occurred()) return NULL;
    if (blen + first_size(io) <= high) Py_RETURN_NONE;
    if (io->flush_queued) {  /* past the high-water mark: send now, as asyncio would */
        if (aem_stream_flush((PyObject *)io) < 0) return NULL;
        Py_RETURN_NONE;
    }
    return call_method0(t, s_maybe_pause);
fail:
    Py_DECREF(buffer);
    return NULL;
}

/* End of the turn (or past the high-water mark): send the turn's writes in one call. */
int aem_stream_flush(PyObject *obj) {
    StreamIOObject *io = (StreamIOObject *)obj;
    if (!io->flush_queued) return 0;  /* flushed early */
    io->flush_queued = 0;
    PyObject *first = io->first;      /* owned from here */
    io->first = NULL;
    PyObject *t = io->transport, *buffer = NULL, *r = NULL;
    int rc = -1;
    if (!t) {
        Py_XDECREF(first);
        return 0;
    }
    Py_INCREF(t);
    int lost = attr_true(io, s_conn_lost);
    if (lost) {
        rc = lost < 0 ? -1 : 0;
        goto done;
    }
    buffer = tattr(io, s_buffer);
    if (!buffer) goto done;
    if (!PyByteArray_Check(buffer)) {
        PyErr_SetString(PyExc_TypeError, "the transport's buffer is not a bytearray");
        goto done;
    }
    Py_ssize_t blen = PyByteArray_GET_SIZE(buffer), flen = first ? PyBytes_GET_SIZE(first) : 0;
    if (!flen && !blen) {
        rc = 0;
        goto done;
    }
    struct iovec iov[2];
    int niov = 0;
    if (flen) iov[niov++] = (struct iovec){PyBytes_AS_STRING(first), (size_t)flen};
    if (blen) iov[niov++] = (struct iovec){PyByteArray_AS_STRING(buffer), (size_t)blen};
    ssize_t n;
    do {
        if (niov == 1) {
            n = send(io->fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
        } else {
            struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
            n = sendmsg(io->fd, &msg, MSG_NOSIGNAL);
        }
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    if (n < 0) {
        if (PyErr_Occurred()) goto done;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", errno, strerror(errno));
            if (!exc) goto done;
            r = PyObject_CallMethodOneArg(t, s_flush_failed, exc);
            Py_DECREF(exc);
            rc = r ? 0 : -1;
            goto done;
        }
        n = 0;
    }
    /* What was not sent stays in the buffer, in order: the rest of first goes in front. */
    if (flen) {
        if (n < flen) {
            PyObject *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(first) + n, flen - n);
            if (!rest || PySequence_SetSlice(buffer, 0, 0, rest) < 0) {
                Py_XDECREF(rest);
                goto done;
            }
            Py_DECREF(rest);
            n = 0;
        } else {
            n -= flen;
        }
    }
    if (n && PySequence_DelSlice(buffer, 0, n) < 0) goto done;
    if (PyByteArray_GET_SIZE(buffer)) {  /* the socket is full: wait for it to drain */
        r = call_method0(t, s_flush_partial);
        rc = r ? 0 : -1;
        goto done;
    }
    int more = 0;
    PyObject *flags[] = {s_protocol_paused, s_closing, s_eof};
    for (int i = 0; i < 3 && !more; i++) {
        more = attr_true(io, flags[i]);
        if (more < 0) goto done;
    }
    if (!more && (more = attr_not_none(io, s_empty_waiter)) < 0) goto done;
    if (more) {
        r = call_method0(t, s_flush_done);
        rc = r ? 0 : -1;
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(r);
    Py_XDECREF(buffer);
    Py_XDECREF(first);
    Py_DECREF(t);
    return rc;
}

/* ---- state for the transport's Python methods --------------------------------------------------------- */

static PyObject *io_take_first(StreamIOObject *io, PyObject *unused) {
    PyObject *f = io->first;
    io->first = NULL;
    return f ? f : Py_NewRef(Py_None);
}

static PyObject *io_pending(StreamIOObject *io, PyObject *unused) { return PyLong_FromSsize_t(first_size(io)); }

static PyObject *io_set_buffered(StreamIOObject *io, PyObject *arg) {
    int b = PyObject_IsTrue(arg);
    if (b < 0) return NULL;
    io->buffered = b;
    Py_RETURN_NONE;
}

static PyObject *io_detach(StreamIOObject *io, PyObject *unused) {
    Py_CLEAR(io->transport);
    Py_CLEAR(io->dict);
    Py_CLEAR(io->first);
    Py_RETURN_NONE;
}

PyObject *aem_stream_new(PyObject *core, PyObject *transport, int fd) {
    StreamIOObject *io = PyObject_GC_New(StreamIOObject, StreamIO_Type);
    if (!io) return NULL;
    io->core = Py_NewRef(core);
    io->transport = Py_NewRef(transport);
    io->dict = PyObject_GenericGetDict(transport, NULL);
    if (!io->dict) PyErr_Clear();  /* no __dict__: every read by getattr() */
    io->first = NULL;
    io->fd = fd;
    io->flush_queued = 0;
    io->buffered = 0;
    PyObject_GC_Track(io);
    return (PyObject *)io;
}

int aem_stream_check(PyObject *obj) { return Py_IS_TYPE(obj, StreamIO_Type); }

static int io_traverse(StreamIOObject *io, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(io));
    Py_VISIT(io->core);
    Py_VISIT(io->transport);
    Py_VISIT(io->dict);
    return 0;
}

static int io_clear(StreamIOObject *io) {
    Py_CLEAR(io->core);
    Py_CLEAR(io->transport);
    Py_CLEAR(io->dict);
    Py_CLEAR(io->first);
    return 0;
}

static void io_dealloc(StreamIOObject *io) {
    PyTypeObject *tp = Py_TYPE(io);
    PyObject_GC_UnTrack(io);
    io_clear(io);
    PyObject_GC_Del(io);
    Py_DECREF(tp);
}

static PyMethodDef io_methods[] = {
    {"read_ready", (PyCFunction)io_read_ready, METH_NOARGS, "The socket is readable: read, hand to the protocol."},
    {"write", (PyCFunction)io_write, METH_O, "write(data): sent at the end of this loop turn."},
    {"take_first", (PyCFunction)io_take_first, METH_NOARGS, "The pending first write (removed), or None."},
    {"pending", (PyCFunction)io_pending, METH_NOARGS, "Bytes of the pending first write."},
    {"set_buffered", (PyCFunction)io_set_buffered, METH_O, "The protocol is a BufferedProtocol (or not)."},
    {"detach", (PyCFunction)io_detach, METH_NOARGS, "Forget the transport (it is closed)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot io_slots[] = {
    {Py_tp_doc, "The hot paths of aem.EventLoop's stream transport (reads, coalesced writes)."},
    {Py_tp_dealloc, io_dealloc},
    {Py_tp_traverse, io_traverse},
    {Py_tp_clear, io_clear},
    {Py_tp_methods, io_methods},
    {0, NULL},
};

static PyType_Spec io_spec = {
    .name = "aem._core.StreamIO",
    .basicsize = sizeof(StreamIOObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = io_slots,
};

int aem_stream_init_type(PyObject *module) {
    struct { PyObject **p; const char *s; } names[] = {
        {&s_conn_lost, "_conn_lost"}, {&s_buffer, "_buffer"}, {&s_eof, "_eof"},
        {&s_empty_waiter, "_empty_waiter"}, {&s_high_water, "_high_water"}, {&s_protocol, "_protocol"},
        {&s_data_received, "data_received"}, {&s_fatal_error, "_fatal_error"},
        {&s_on_eof, "_read_ready__on_eof"}, {&s_read_ready_cb, "_read_ready_cb"},
        {&s_write_lost, "_aem_write_lost"}, {&s_maybe_pause, "_maybe_pause_protocol"},
        {&s_flush_failed, "_aem_flush_failed"}, {&s_flush_partial, "_aem_flush_partial"},
        {&s_flush_done, "_aem_flush_done"}, {&s_protocol_paused, "_protocol_paused"},
        {&s_closing, "_closing"}, {&m_read_error, "Fatal read error on socket transport"},
        {&m_proto_error, "Fatal error: protocol.data_received() call failed."},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].p = PyUnicode_InternFromString(names[i].s))) return -1;
    StreamIO_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &io_spec, NULL);
    return StreamIO_Type ? 0 : -1;
}
