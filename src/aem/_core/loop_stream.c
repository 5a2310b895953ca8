/* loop_stream.c — aem._core.StreamIO: the hot paths of aem.EventLoop's stream transport.
 *
 * aem.loop.transports.SocketTransport is asyncio's _SelectorSocketTransport; its
 * StreamIO does, in C, what runs for every message:
 *
 *   read_ready()  the socket is readable: one recv() (loop_fd.c, aem_loop_read), the
 *                 bytes (exact size) to protocol.data_received
 *   write(data)   keep the data until the end of the loop turn (the first write of a
 *                 turn as is, later ones appended to the transport's bytearray buffer)
 *   flush         (end of the turn, from loop.c) one send() or sendmsg() (writev) of
 *                 everything written during the turn
 *
 * The transport's state stays in its Python attributes (_conn_lost, _buffer, _eof ...), so
 * asyncio's own methods (close, abort, write_eof, flow control, sendfile) keep working on it;
 * SocketTransport declares them as __slots__ (asyncio's _FlowControlMixin already has
 * _protocol_paused and _high_water as slots), and they are read here at their offsets in the
 * object, read once per transport type: no dictionary lookup per read (they were ~2,000 of the
 * ~6,000 instructions an echo of 1 KiB cost).  A type without those slots is read by getattr().  Everything uncommon — errors, EOF, buffered protocols,
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

/* The transport's state the hot paths read. */
enum { A_CONN_LOST, A_BUFFER, A_EOF, A_EMPTY_WAITER, A_PROTOCOL, A_CLOSING, A_PROTOCOL_PAUSED, A_HIGH_WATER,
       A__N };

typedef struct {
    PyObject_HEAD
    PyObject *core;       /* the loop's LoopCore */
    PyObject *transport;  /* the SocketTransport */
    PyObject *first;      /* the first write of this turn, not yet sent (bytes), or NULL */
    Py_ssize_t off[A__N]; /* where each is in the transport object (a slot), or -1: getattr() */
    size_t last_read;     /* bytes the last read brought (what the next one is expected to bring) */
    uint64_t turn;        /* the loop turn of the last write() */
    int writes;           /* write() calls in that turn */
    int eager;            /* the turn before that wrote once: this turn's first write is sent at once */
    int fd;
    int flush_queued;
    int buffered;         /* the protocol is a BufferedProtocol: reads go through Python */
} StreamIOObject;

static PyTypeObject *StreamIO_Type;
static PyObject *a_names[A__N];
static PyObject *s_data_received, *s_fatal_error, *s_on_eof, *s_read_ready_cb, *s_write_lost, *s_maybe_pause,
    *s_flush_failed, *s_flush_partial, *s_flush_done, *m_read_error, *m_proto_error;

/* The offsets of the state in objects of type tp (a few type-cache lookups, once per transport). */
static void read_offsets(PyTypeObject *tp, Py_ssize_t *off) {
    for (int a = 0; a < A__N; a++) off[a] = aem_slot_offset(tp, a_names[a]);
}

/* transport.<state a> (a new reference); io->transport is set. */
static inline PyObject *tattr(StreamIOObject *io, int a) {
    Py_ssize_t off = io->off[a];
    if (off >= 0) {
        PyObject *v = SLOT(io->transport, off);
        if (v) return Py_NewRef(v);
    }
    return PyObject_GetAttr(io->transport, a_names[a]);  /* unset: AttributeError */
}

/* transport.<state a> is true? 1/0, -1 on error. */
static inline int attr_true(StreamIOObject *io, int a) {
    Py_ssize_t off = io->off[a];
    PyObject *v = off >= 0 ? SLOT(io->transport, off) : NULL;
    if (v == Py_False || v == Py_None) return 0;
    if (v == Py_True) return 1;
    if (v) return PyObject_IsTrue(v);
    if (!(v = tattr(io, a))) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static inline int attr_not_none(StreamIOObject *io, int a) {
    Py_ssize_t off = io->off[a];
    PyObject *v = off >= 0 ? SLOT(io->transport, off) : NULL;
    if (v) return v != Py_None;
    if (!(v = tattr(io, a))) return -1;
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

/* A read failed: err is its errno, or 0 with an exception set (a signal handler's). */
static PyObject *read_failed(PyObject *t, int err) {
    if (!err) return NULL;
    if (err == EAGAIN || err == EWOULDBLOCK) Py_RETURN_NONE;
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return to_fatal_error(t, m_read_error);
}

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
    int lost = attr_true(io, A_CONN_LOST);
    if (lost) return lost < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *proto = tattr(io, A_PROTOCOL);
    if (!proto) return NULL;
    int err;
    aem_feed st;
    if (aem_feed_begin(proto, &st)) {  /* a StreamReaderProtocol: the read goes into its reader's buffer */
        Py_DECREF(proto);
        Py_ssize_t n = aem_loop_read_append(io->fd, st.buffer, io->last_read, &err);
        if (n > 0) {
            io->last_read = (size_t)n;
            return aem_feed_end(&st) < 0 ? to_fatal_error(t, m_proto_error) : Py_NewRef(Py_None);
        }
        aem_feed_release(&st);
        if (n == 0) return call_method0(t, s_on_eof);
        return read_failed(t, err);
    }
    PyObject *data = aem_loop_read(io->fd, SIZE_MAX, io->last_read, &err);
    if (!data) {
        Py_DECREF(proto);
        return read_failed(t, err);
    }
    if (PyBytes_GET_SIZE(data) == 0) {
        Py_DECREF(proto);
        Py_DECREF(data);
        return call_method0(t, s_on_eof);
    }
    io->last_read = (size_t)PyBytes_GET_SIZE(data);
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
    int r = attr_true(io, A_EOF);
    if (r) {
        if (r > 0) PyErr_SetString(PyExc_RuntimeError, "Cannot call write() after write_eof()");
        return NULL;
    }
    r = attr_not_none(io, A_EMPTY_WAITER);
    if (r) {
        if (r > 0) PyErr_SetString(PyExc_RuntimeError, "unable to write; sendfile is in progress");
        return NULL;
    }
    Py_ssize_t len = PyObject_Length(data);
    if (len < 0) return NULL;
    if (len == 0) Py_RETURN_NONE;
    r = attr_true(io, A_CONN_LOST);
    if (r) return r < 0 ? NULL : PyObject_CallMethodOneArg(t, s_write_lost, data);
    uint64_t turn = ((LoopCoreObject *)io->core)->turns;
    if (io->turn != turn) {  /* the first write of this turn */
        io->eager = io->writes == 1;
        io->turn = turn;
        io->writes = 0;
    }
    io->writes++;
    PyObject *buffer = tattr(io, A_BUFFER);
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
        if (io->eager && io->writes == 1 && !io->flush_queued) {
            /* A lone write (the last turn that wrote wrote once): sent now, not at the end of the
             * turn -- what the rest of the turn runs is not between the peer and its answer. */
            int busy = attr_true(io, A_CLOSING);
            if (!busy) busy = attr_true(io, A_PROTOCOL_PAUSED);
            if (busy < 0) goto fail;
            if (!busy) {
                Py_DECREF(buffer);
                io->flush_queued = 1;  /* aem_stream_flush sends only what is queued */
                return aem_stream_flush((PyObject *)io) < 0 ? NULL : Py_NewRef(Py_None);
            }
        }
        if (!io->flush_queued) {
            if (aem_loop_flush_later(io->core, (PyObject *)io) < 0) goto fail;
            io->flush_queued = 1;
        }
    }
    Py_DECREF(buffer);
    PyObject *hw = tattr(io, A_HIGH_WATER);
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
    int lost = attr_true(io, A_CONN_LOST);
    if (lost) {
        rc = lost < 0 ? -1 : 0;
        goto done;
    }
    buffer = tattr(io, A_BUFFER);
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
    int flags[] = {A_PROTOCOL_PAUSED, A_CLOSING, A_EOF};
    for (int i = 0; i < 3 && !more; i++) {
        more = attr_true(io, flags[i]);
        if (more < 0) goto done;
    }
    if (!more && (more = attr_not_none(io, A_EMPTY_WAITER)) < 0) goto done;
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

/* is_closing(): transport._closing (StreamWriter.drain asks on every message). */
static PyObject *io_is_closing(StreamIOObject *io, PyObject *unused) {
    if (!io->transport) Py_RETURN_TRUE;
    return tattr(io, A_CLOSING);
}

static PyObject *io_set_buffered(StreamIOObject *io, PyObject *arg) {
    int b = PyObject_IsTrue(arg);
    if (b < 0) return NULL;
    io->buffered = b;
    Py_RETURN_NONE;
}

static PyObject *io_detach(StreamIOObject *io, PyObject *unused) {
    Py_CLEAR(io->transport);
    Py_CLEAR(io->first);
    Py_RETURN_NONE;
}

PyObject *aem_stream_new(PyObject *core, PyObject *transport, int fd) {
    aem_feed_prepare();
    StreamIOObject *io = PyObject_GC_New(StreamIOObject, StreamIO_Type);
    if (!io) return NULL;
    io->core = Py_NewRef(core);
    io->transport = Py_NewRef(transport);
    read_offsets(Py_TYPE(transport), io->off);
    io->first = NULL;
    io->fd = fd;
    io->last_read = 0;
    io->turn = 0;
    io->writes = 0;
    io->eager = 0;
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
    return 0;
}

static int io_clear(StreamIOObject *io) {
    Py_CLEAR(io->core);
    Py_CLEAR(io->transport);
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
    {"is_closing", (PyCFunction)io_is_closing, METH_NOARGS, "The transport's is_closing()."},
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
    if (aem_feed_init() < 0) return -1;
    const char *state[A__N] = {"_conn_lost", "_buffer", "_eof", "_empty_waiter", "_protocol", "_closing",
                               "_protocol_paused", "_high_water"};
    for (int a = 0; a < A__N; a++)
        if (!(a_names[a] = PyUnicode_InternFromString(state[a]))) return -1;
    struct { PyObject **p; const char *s; } names[] = {
        {&s_data_received, "data_received"}, {&s_fatal_error, "_fatal_error"},
        {&s_on_eof, "_read_ready__on_eof"}, {&s_read_ready_cb, "_read_ready_cb"},
        {&s_write_lost, "_aem_write_lost"}, {&s_maybe_pause, "_maybe_pause_protocol"},
        {&s_flush_failed, "_aem_flush_failed"}, {&s_flush_partial, "_aem_flush_partial"},
        {&s_flush_done, "_aem_flush_done"}, {&m_read_error, "Fatal read error on socket transport"},
        {&m_proto_error, "Fatal error: protocol.data_received() call failed."},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].p = PyUnicode_InternFromString(names[i].s))) return -1;
    StreamIO_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &io_spec, NULL);
    return StreamIO_Type ? 0 : -1;
}
