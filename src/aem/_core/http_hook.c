/* http_hook.c — aem._core.HttpReadHook: AEMhttpd's fast path inside aem.Read's delivery.
 *
 * A connection's aem.Read is registered with an HttpReadHook as its handler.  The engine
 * (delivery.c, deliver_read) sees the type and hands the bytes read to aem_http_read_hook
 * before any event object exists: when the connection is between requests, the requests
 * are answered here and the connection's idle deadline is moved, with no Python frame but
 * the app's.  What is left is delivered as usual: the hook is callable, and calls the
 * connection's on_read(event). */
#include "pyaem.h"
#include "http_fast.h"

#include <structmember.h>

enum { S_OUT, S_LINGERING, S_DEADLINE, S_CHECK, S_PHASE, S_DEAD, S__COUNT };

typedef struct {
    PyObject_HEAD
    HttpFastObject *fast;
    PyObject *conn, *on_read, *parser;
    int64_t idle_ns;
    Py_ssize_t off[S__COUNT];   /* the attributes' slot offsets (-1: by name) */
} HttpReadHookObject;

static PyObject *hook_get(HttpReadHookObject *h, int which, PyObject *obj, PyObject *name) {
    if (h->off[which] < 0) return PyObject_GetAttr(obj, name);
    PyObject *v = *(PyObject **)((char *)obj + h->off[which]);
    if (!v) PyErr_SetObject(PyExc_AttributeError, name);
    return Py_XNewRef(v);
}

static int hook_set(HttpReadHookObject *h, int which, PyObject *obj, PyObject *name, PyObject *v) {
    if (h->off[which] < 0) return PyObject_SetAttr(obj, name, v);
    Py_XSETREF(*(PyObject **)((char *)obj + h->off[which]), Py_NewRef(v));
    return 0;
}

PyTypeObject *aem_http_hook_type;
static PyObject *str_out, *str_lingering, *str_phase, *str_dead, *str_deadline, *str_check, *str_schedule,
    *str_internal_error;

/* True when conn is between requests with nothing queued (conn.out empty, not lingering,
 * conn.http.parser idle and alive): the state the fast path starts from. */
static int conn_idle(HttpReadHookObject *h) {
    PyObject *v = hook_get(h, S_OUT, h->conn, str_out);
    if (!v) return -1;
    int ok = PyList_CheckExact(v) && PyList_GET_SIZE(v) == 0;
    Py_DECREF(v);
    if (!ok) return 0;
    v = hook_get(h, S_LINGERING, h->conn, str_lingering);
    if (!v) return -1;
    ok = v == Py_False;
    Py_DECREF(v);
    if (!ok) return 0;
    v = hook_get(h, S_PHASE, h->parser, str_phase);
    if (!v) return -1;
    ok = PyLong_CheckExact(v) && PyLong_AsLong(v) == 0;
    Py_DECREF(v);
    if (!ok) return 0;
    v = hook_get(h, S_DEAD, h->parser, str_dead);
    if (!v) return -1;
    ok = v == Py_False;
    Py_DECREF(v);
    return ok;
}

/* The idle deadline after a read answered in full (as _Conn.on_read sets it). */
static int conn_rearm(HttpReadHookObject *h, int64_t time_ns) {
    PyObject *dl = PyLong_FromLongLong(time_ns + h->idle_ns);
    if (!dl || hook_set(h, S_DEADLINE, h->conn, str_deadline, dl) < 0) {
        Py_XDECREF(dl);
        return -1;
    }
    PyObject *check = hook_get(h, S_CHECK, h->conn, str_check);
    int rc = 0;
    if (!check) rc = -1;
    else if (PyObject_RichCompareBool(dl, check, Py_LT) == 1) {
        PyObject *server = h->fast->server;
        PyObject *r = PyObject_CallMethodObjArgs(server, str_schedule, h->conn, dl, NULL);
        if (!r) rc = -1;
        Py_XDECREF(r);
    }
    Py_XDECREF(check);
    Py_DECREF(dl);
    return rc;
}

int aem_http_read_hook(PyObject *hook, int fd, const char *data, size_t n, int64_t time_ns, PyObject **rest) {
    HttpReadHookObject *h = (HttpReadHookObject *)hook;
    *rest = NULL;
    int idle = conn_idle(h);
    if (idle < 0) return -1;
    PyObject *bytes = PyBytes_FromStringAndSize(data, (Py_ssize_t)n);
    if (!bytes) return -1;
    if (!idle) {
        *rest = bytes;
        return 0;
    }
    int slowed = 0;
    PyObject *r = aem_http_serve_fd(h->fast, h->conn, fd, bytes, &slowed);
    Py_DECREF(bytes);
    if (!r) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
        /* as on_read: an internal error closes the connection, the server goes on */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb) PyException_SetTraceback(value, tb);
        r = PyObject_CallMethodObjArgs(h->fast->server, str_internal_error, h->conn, value, NULL);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (!r) return -1;
        Py_DECREF(r);
        return 1;
    }
    Py_ssize_t left = PyObject_Length(r);
    if (left < 0) {
        Py_DECREF(r);
        return -1;
    }
    if (left > 0) {
        *rest = r;
        return 0;
    }
    Py_DECREF(r);
    /* all answered: unless the glue moved the connection on (blocked, closed), re-arm */
    if (slowed && (idle = conn_idle(h)) < 0) return -1;
    if (idle && conn_rearm(h, time_ns) < 0) return -1;
    return 1;
}

static int hook_init(HttpReadHookObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fast", "conn", "on_read", "idle_ns", NULL};
    PyObject *fast, *conn, *on_read;
    long long idle_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOL:HttpReadHook", kwlist, &fast, &conn, &on_read, &idle_ns))
        return -1;
    if (!PyObject_TypeCheck(fast, (PyTypeObject *)aem_http_fast_type)) {
        PyErr_SetString(PyExc_TypeError, "fast must be an aem._core.HttpFast");
        return -1;
    }
    PyObject *http = PyObject_GetAttrString(conn, "http");  /* its protocol.Connection */
    PyObject *parser = http ? PyObject_GetAttrString(http, "parser") : NULL;
    Py_XDECREF(http);
    if (!parser) return -1;
    Py_XSETREF(self->fast, (HttpFastObject *)Py_NewRef(fast));
    Py_XSETREF(self->conn, Py_NewRef(conn));
    Py_XSETREF(self->on_read, Py_NewRef(on_read));
    Py_XSETREF(self->parser, parser);
    self->idle_ns = idle_ns;
    PyObject *names[S__COUNT] = {str_out, str_lingering, str_deadline, str_check, str_phase, str_dead};
    for (int i = 0; i < S__COUNT; i++)
        self->off[i] = aem_slot_offset(Py_TYPE(i < S_PHASE ? conn : parser), names[i]);
    return 0;
}

static PyObject *hook_call(HttpReadHookObject *self, PyObject *args, PyObject *kwds) {
    return PyObject_Call(self->on_read, args, kwds);
}

static int hook_traverse(HttpReadHookObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->fast);
    Py_VISIT(self->conn);
    Py_VISIT(self->on_read);
    Py_VISIT(self->parser);
    return 0;
}

static int hook_clear(HttpReadHookObject *self) {
    Py_CLEAR(self->fast);
    Py_CLEAR(self->conn);
    Py_CLEAR(self->on_read);
    Py_CLEAR(self->parser);
    return 0;
}

static void hook_dealloc(HttpReadHookObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyType_Slot hook_slots[] = {
    {Py_tp_init, hook_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_call, hook_call},
    {Py_tp_dealloc, hook_dealloc},
    {Py_tp_traverse, hook_traverse},
    {Py_tp_clear, hook_clear},
    {Py_tp_doc, "HttpReadHook(fast, conn, on_read, idle_ns): the handler of a connection's aem.Read "
                "that lets the engine run the fast path before any event exists (see aem.http.fast)."},
    {0, NULL},
};

static PyType_Spec hook_spec = {
    "aem._core.HttpReadHook", sizeof(HttpReadHookObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, hook_slots,
};


int aem_http_hook_init(PyObject *module) {
#define INTERN(var, s) if (!(var = PyUnicode_InternFromString(s))) return -1
    INTERN(str_out, "out");
    INTERN(str_lingering, "lingering");
    INTERN(str_phase, "phase");
    INTERN(str_dead, "dead");
    INTERN(str_deadline, "deadline");
    INTERN(str_check, "check");
    INTERN(str_schedule, "_schedule");
    INTERN(str_internal_error, "_internal_error");
#undef INTERN
    PyObject *hk = PyType_FromSpec(&hook_spec);
    if (!hk || PyModule_AddObjectRef(module, "HttpReadHook", hk) < 0) {
        Py_XDECREF(hk);
        return -1;
    }
    aem_http_hook_type = (PyTypeObject *)hk;
    return 0;
}
