/* loop_feed.c — asyncio.streams' StreamReaderProtocol.data_received, done in C by the stream transport.
 *
 * A streams server (asyncio.start_server, open_connection) hands every read to
 * StreamReaderProtocol.data_received, which runs four Python frames per message: data_received,
 * the _stream_reader property, StreamReader.feed_data and StreamReader._wakeup_waiter.  When the
 * protocol is exactly asyncio.streams.StreamReaderProtocol and its reader exactly
 * asyncio.streams.StreamReader, with those methods the ones asyncio.streams defines (checked
 * again whenever either class is modified: its version tag changes), aem_feed_stream_reader does
 * what they do, in the same order, on the same attributes:
 *
 *   reader = protocol._stream_reader_wr()           (nothing if None or dead)
 *   reader._buffer.extend(data)
 *   waiter = reader._waiter; if waiter is not None:
 *       reader._waiter = None; if not waiter.cancelled(): waiter.set_result(None)
 *
 * and hands back to the Python call anything else, before changing anything: a subclass, an
 * instance with its own data_received/feed_data/_wakeup_waiter, feed_data after EOF (asyncio's
 * assert), a read that would pause the transport (the buffer past 2 x limit), attributes of other
 * types than asyncio sets, a profiler or tracer (it sees the Python calls).
 *
 * Returns 1 (done), 0 (take the Python call; nothing changed) or -1 (an exception is set: what the
 * Python data_received would have raised, at the same point).
 */
#include "loop.h"

#include <limits.h>
#include <string.h>

static PyTypeObject *proto_type, *reader_type; /* asyncio.streams.StreamReaderProtocol, StreamReader */
static unsigned int proto_tag, reader_tag;       /* their version tags when last checked (0: recheck) */
static unsigned long long fed;                   /* reads fed here so far (tests look) */
static int loaded;                               /* 1: the types are known; -1: asyncio.streams unusable */
static PyObject *n_module, *n_data_received, *n_stream_reader, *n_feed_data, *n_wakeup_waiter, *n_wr, *n_eof,
    *n_buffer, *n_waiter, *n_transport, *n_paused, *n_limit, *n_cancelled, *n_set_result;

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

/* Read obj.<names[i]> into v[i] (new references; all NULL and -1 on error). */
static int attrs(PyObject *obj, PyObject *const *names, PyObject **v, int n) {
    for (int i = 0; i < n; i++) {
        if (!(v[i] = PyObject_GetAttr(obj, names[i]))) {
            while (i--) Py_CLEAR(v[i]);
            return -1;
        }
    }
    return 0;
}

enum { R_EOF, R_BUFFER, R_WAITER, R_TRANSPORT, R_PAUSED, R_LIMIT, R__N };

int aem_feed_stream_reader(PyObject *proto, PyObject *data) {
    if (loaded <= 0 || Py_TYPE(proto) != proto_type) return 0;
    PyThreadState *ts = PyThreadState_Get();
    if (ts->c_profilefunc || ts->c_tracefunc || !types_unchanged()) return 0;
    int own = own_method(proto, n_data_received);
    if (own <= 0) return own;
    /* reader = self._stream_reader (the property: None or the weakly referred reader) */
    PyObject *wr = PyObject_GetAttr(proto, n_wr), *reader = NULL, *v[R__N] = {NULL};
    if (!wr) return -1;
    int rc = 0;
    if (wr == Py_None) {  /* the protocol has no reader: data_received does nothing */
        rc = 1;
        goto done;
    }
    if (!PyWeakref_CheckRefExact(wr)) goto done;
    reader = Py_NewRef(PyWeakref_GET_OBJECT(wr));
    if (reader == Py_None) {
        rc = 1;
        goto done;
    }
    if (Py_TYPE(reader) != reader_type) goto done;
    if ((own = own_method(reader, n_feed_data)) <= 0 || (own = own_method(reader, n_wakeup_waiter)) <= 0) {
        rc = own;
        goto done;
    }
    PyObject *const names[R__N] = {n_eof, n_buffer, n_waiter, n_transport, n_paused, n_limit};
    if (attrs(reader, names, v, R__N) < 0) goto error;
    PyObject *buffer = v[R_BUFFER], *paused = v[R_PAUSED], *limit = v[R_LIMIT];
    if (v[R_EOF] != Py_False || !PyByteArray_CheckExact(buffer)) goto done; /* feed_data asserts not _eof */
    Py_ssize_t blen = PyByteArray_GET_SIZE(buffer), dlen = PyBytes_GET_SIZE(data);
    if (v[R_TRANSPORT] != Py_None && paused != Py_True) {  /* would this read pause the transport? */
        if (paused != Py_False || !PyLong_CheckExact(limit)) goto done;
        int overflow;
        long long lim = PyLong_AsLongLongAndOverflow(limit, &overflow);
        if (lim == -1 && PyErr_Occurred()) goto error;
        if (overflow < 0 || (!overflow && lim <= LLONG_MAX / 2 && (long long)blen + dlen > 2 * lim))
            goto done; /* the Python call pauses it */
    }
    /* From here on, what feed_data and _wakeup_waiter do, in their order. */
    if (PyByteArray_Resize(buffer, blen + dlen) < 0) goto error;
    memcpy(PyByteArray_AS_STRING(buffer) + blen, PyBytes_AS_STRING(data), (size_t)dlen);
    PyObject *waiter = v[R_WAITER];
    if (waiter != Py_None) {
        if (PyObject_SetAttr(reader, n_waiter, Py_None) < 0) goto error;
        PyObject *c = PyObject_CallMethodNoArgs(waiter, n_cancelled);
        int cancelled = c ? PyObject_IsTrue(c) : -1;
        Py_XDECREF(c);
        if (cancelled < 0) goto error;
        if (!cancelled) {
            PyObject *s = PyObject_CallMethodOneArg(waiter, n_set_result, Py_None);
            if (!s) goto error;
            Py_DECREF(s);
        }
    }
    fed++;
    rc = 1;
    goto done;
error:
    rc = -1;
done:
    for (int i = 0; i < R__N; i++) Py_XDECREF(v[i]);
    Py_XDECREF(reader);
    Py_DECREF(wr);
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
        {&n_paused, "_paused"}, {&n_limit, "_limit"}, {&n_cancelled, "cancelled"}, {&n_set_result, "set_result"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].p = PyUnicode_InternFromString(names[i].s))) return -1;
    return 0;
}
