/* loop_feed.c — asyncio.streams' StreamReaderProtocol.data_received, done in C by the stream transport.
 *
 * A streams server (asyncio.start_server, open_connection) hands every read to
 * StreamReaderProtocol.data_received, which runs four Python frames per message: data_received,
 * the _stream_reader property, StreamReader.feed_data and StreamReader._wakeup_waiter.  When the
 * protocol is exactly asyncio.streams.StreamReaderProtocol and its reader exactly
 * asyncio.streams.StreamReader, with those methods the ones asyncio.streams defines (checked
 * again whenever either class is modified: its version tag changes), the transport (loop_stream.c)
 * reads straight into the reader's buffer and aem_feed_end does the rest of what they do, in the
 * same order, on the same attributes:
 *
 *   reader = protocol._stream_reader_wr()
 *   reader._buffer.extend(data)                      (the read itself, aem_loop_read_append)
 *   waiter = reader._waiter; if waiter is not None:
 *       reader._waiter = None; if not waiter.cancelled(): waiter.set_result(None)
 *   if reader._transport is not None and not reader._paused and len(reader._buffer) > 2 * reader._limit:
 *       try: reader._transport.pause_reading()
 *       except NotImplementedError: reader._transport = None
 *       else: reader._paused = True
 *
 * Everything else takes the Python call, decided before the read: a subclass, an instance with its
 * own data_received/feed_data/_wakeup_waiter, no reader, feed_data after EOF (asyncio's assert), a
 * buffer with exports (memoryviews of it), attributes of types asyncio never sets, a profiler or a
 * tracer (they see the Python calls).
 */
#include "loop.h"

#include <limits.h>
#include <string.h>

static PyTypeObject *proto_type, *reader_type; /* asyncio.streams.StreamReaderProtocol, StreamReader */
static unsigned int proto_tag, reader_tag;       /* their version tags when last checked (0: recheck) */
static unsigned long long fed;                   /* reads fed here so far (tests look) */
static int loaded;                               /* 1: the types are known; -1: asyncio.streams unusable */
static PyObject *n_module, *n_data_received, *n_stream_reader, *n_feed_data, *n_wakeup_waiter, *n_wr, *n_eof,
    *n_buffer, *n_waiter, *n_transport, *n_paused, *n_limit, *n_cancelled, *n_set_result, *n_pause_reading;

/* tp.name is asyncio.streams' own function (qualname), or a property whose getter is. */
static int is_original(PyTypeObject *tp, PyObject *name, const char *qualname, int property) {
    PyObject *d = _PyType_Lookup(tp, name); /* borrowed */
    if (!d) return 0;
    PyObject *f = d;
    if (property) {
        if (!Py_IS_TYPE(d, &PyProperty_Type)) return 0;
        f = PyObject_GetAttrString(d, "fget");
        if (!f) {
            PyErr_Clear();
            return 0;
        }
        Py_DECREF(f); /* the property keeps it */
    }
    if (!PyFunction_Check(f)) return 0;
    PyObject *mod = PyFunction_GET_MODULE(f), *qn = ((PyFunctionObject *)f)->func_qualname;
    return mod && PyUnicode_Check(mod) && PyUnicode_Compare(mod, n_module) == 0 && qn && PyUnicode_Check(qn) &&
           PyUnicode_CompareWithASCIIString(qn, qualname) == 0;
}

static inline unsigned int tag_of(PyTypeObject *tp) {
    return PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG) ? tp->tp_version_tag : 0;
}

/* Both classes still have asyncio's methods (looked at again only after either was modified). */
static int types_unchanged(void) {
    if (proto_tag && reader_tag && tag_of(proto_type) == proto_tag && tag_of(reader_type) == reader_tag) return 1;
    int ok = PyErr_Occurred() == NULL &&
             is_original(proto_type, n_data_received, "StreamReaderProtocol.data_received", 0) &&
             is_original(proto_type, n_stream_reader, "StreamReaderProtocol._stream_reader", 1) &&
             is_original(reader_type, n_feed_data, "StreamReader.feed_data", 0) &&
             is_original(reader_type, n_wakeup_waiter, "StreamReader._wakeup_waiter", 0);
    /* the lookups above assigned the tags (if the interpreter has tags left) */
    proto_tag = ok ? tag_of(proto_type) : 0;
    reader_tag = ok ? tag_of(reader_type) : 0;
    return ok;
}

/* The types, once (the first stream transport; asyncio is imported by then). */
static void load(void) {
    loaded = -1;
    PyObject *m = PyImport_ImportModule("asyncio.streams");
    if (!m) {
        PyErr_Clear();
        return;
    }
    PyObject *p = PyObject_GetAttrString(m, "StreamReaderProtocol"), *r = PyObject_GetAttrString(m, "StreamReader");
    Py_DECREF(m);
    if (!p || !r || !PyType_Check(p) || !PyType_Check(r)) {
        PyErr_Clear();
        Py_XDECREF(p);
        Py_XDECREF(r);
        return;
    }
    proto_type = (PyTypeObject *)p; /* kept for the life of the process */
    reader_type = (PyTypeObject *)r;
    loaded = 1;
}

/* obj.name is the method its type defines (no attribute of the instance hides it)? 1/0, -1 on error. */
static int own_method(PyObject *obj, PyObject *name) {
    PyObject *m = NULL;
#if PY_VERSION_HEX < 0x030D0000
    int unbound = _PyObject_GetMethod(obj, name, &m);
    int r = !m ? -1 : unbound ? m == _PyType_Lookup(Py_TYPE(obj), name) : 0;
#else
    int r = -1;
    if ((m = PyObject_GetAttr(obj, name)))
        r = PyMethod_Check(m) && PyMethod_GET_SELF(m) == obj &&
            PyMethod_GET_FUNCTION(m) == _PyType_Lookup(Py_TYPE(obj), name);
#endif
    Py_XDECREF(m);
    return r;
}

int aem_feed_begin(PyObject *proto, aem_feed *st) {
    *st = (aem_feed){NULL};
    if (loaded <= 0 || Py_TYPE(proto) != proto_type) return 0;
    PyThreadState *ts = PyThreadState_Get();
    if (ts->c_profilefunc || ts->c_tracefunc || !types_unchanged()) return 0;
    if (own_method(proto, n_data_received) <= 0) goto no;
    /* reader = self._stream_reader: the property reads _stream_reader_wr (None or a weakref) */
    PyObject *wr = PyObject_GetAttr(proto, n_wr);
    if (!wr) goto no;
    PyObject *reader = PyWeakref_CheckRefExact(wr) ? PyWeakref_GET_OBJECT(wr) : NULL;
    st->reader = reader && Py_TYPE(reader) == reader_type ? Py_NewRef(reader) : NULL;
    Py_DECREF(wr);
    if (!st->reader || own_method(reader, n_feed_data) <= 0 || own_method(reader, n_wakeup_waiter) <= 0) goto no;
    PyObject *eof = PyObject_GetAttr(reader, n_eof);
    if (!eof) goto no;
    Py_DECREF(eof);  /* compared by identity only */
    if (eof != Py_False) goto no;  /* feed_data asserts not _eof: the Python call raises */
    if (!(st->buffer = PyObject_GetAttr(reader, n_buffer)) || !(st->waiter = PyObject_GetAttr(reader, n_waiter)) ||
        !(st->transport = PyObject_GetAttr(reader, n_transport)) ||
        !(st->paused = PyObject_GetAttr(reader, n_paused)) || !(st->limit = PyObject_GetAttr(reader, n_limit)))
        goto no;
    if (!PyByteArray_CheckExact(st->buffer) || ((PyByteArrayObject *)st->buffer)->ob_exports > 0) goto no;
    if (st->transport != Py_None && st->paused != Py_True &&
        (st->paused != Py_False || !PyLong_CheckExact(st->limit)))
        goto no;  /* a state asyncio never sets: its own code decides */
    return 1;
no:
    PyErr_Clear(); /* the Python call meets the same error, where asyncio would */
    aem_feed_release(st);
    return 0;
}

void aem_feed_release(aem_feed *st) {
    Py_CLEAR(st->reader);
    Py_CLEAR(st->buffer);
    Py_CLEAR(st->waiter);
    Py_CLEAR(st->transport);
    Py_CLEAR(st->paused);
    Py_CLEAR(st->limit);
}

/* The rest of feed_data once the read is in the buffer: _wakeup_waiter, then the pause. */
static int feed_end(aem_feed *st) {
    PyObject *reader = st->reader, *waiter = st->waiter;
    if (waiter != Py_None) {
        if (PyObject_SetAttr(reader, n_waiter, Py_None) < 0) return -1;
        PyObject *c = PyObject_CallMethodNoArgs(waiter, n_cancelled);
        int cancelled = c ? PyObject_IsTrue(c) : -1;
        Py_XDECREF(c);
        if (cancelled < 0) return -1;
        if (!cancelled) {
            PyObject *r = PyObject_CallMethodOneArg(waiter, n_set_result, Py_None);
            if (!r) return -1;
            Py_DECREF(r);
        }
    }
    if (st->transport == Py_None || st->paused != Py_False) return 0;
    int overflow;
    long long lim = PyLong_AsLongLongAndOverflow(st->limit, &overflow);
    if (lim == -1 && PyErr_Occurred()) return -1;
    long long len = PyByteArray_GET_SIZE(st->buffer);
    if (overflow > 0 || (!overflow && lim > LLONG_MAX / 2) || (!overflow && len <= 2 * lim)) return 0;
    /* try: self._transport.pause_reading() except NotImplementedError: self._transport = None
     * else: self._paused = True */
    PyObject *r = PyObject_CallMethodNoArgs(st->transport, n_pause_reading);
    if (r) {
        Py_DECREF(r);
        return PyObject_SetAttr(reader, n_paused, Py_True);
    }
    if (!PyErr_ExceptionMatches(PyExc_NotImplementedError)) return -1;
    PyErr_Clear();
    return PyObject_SetAttr(reader, n_transport, Py_None);
}

int aem_feed_end(aem_feed *st) {
    int rc = feed_end(st);
    if (rc == 0) fed++;
    aem_feed_release(st);
    return rc;
}

unsigned long long aem_feed_count(void) { return fed; }

void aem_feed_prepare(void) {
    if (!loaded) load();
}

int aem_feed_init(void) {
    struct { PyObject **p; const char *s; } names[] = {
        {&n_module, "asyncio.streams"}, {&n_data_received, "data_received"}, {&n_stream_reader, "_stream_reader"},
        {&n_feed_data, "feed_data"}, {&n_wakeup_waiter, "_wakeup_waiter"}, {&n_wr, "_stream_reader_wr"},
        {&n_eof, "_eof"}, {&n_buffer, "_buffer"}, {&n_waiter, "_waiter"}, {&n_transport, "_transport"},
        {&n_paused, "_paused"}, {&n_limit, "_limit"}, {&n_cancelled, "cancelled"}, {&n_set_result, "set_result"}, {&n_pause_reading, "pause_reading"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].p = PyUnicode_InternFromString(names[i].s))) return -1;
    return 0;
}
