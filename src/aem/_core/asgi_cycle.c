/* asgi_cycle.c — the C half of aem.http.asgi: one request's receive/send (AsgiCycle), the
 * connection's write link (AsgiLink) and the awaitable that is already done (AsgiDone).
 *
 * AsgiCycle is the base of aem.http.asgi._Cycle: its state lives here (members the Python
 * half reads and writes by name), and its receive() and send() are C.  The usual exchange
 * never leaves C:
 *
 *   receive()                      the whole request body (already read): a done awaitable
 *   send(http.response.start)      status and fields checked and rendered to header lines
 *   send(http.response.body)       no more_body, the length agreeing: head + body framed
 *                                  here and handed to the link, written at the end of the
 *                                  loop turn (one burst of sends per turn, not one per task)
 *
 * Anything else (a streaming body, a body that streams in, HEAD, sendfile, an odd field, a
 * closed connection, a message the server refuses) goes to the Python half: _send_slow(msg)
 * and _receive_slow(), coroutines, with the same semantics as before this file existed.
 *
 * AsgiLink: one per connection; holds the bytes of a finished response until the end of the
 * loop turn (LoopCore's flush queue calls its _aem_flush), or until the connection needs its
 * output in order (flush()).
 */
#include "pyaem.h"
#include "loop.h"

#include <structmember.h>

#include <string.h>
#include <time.h>

static PyObject *s_type, *s_status, *s_headers, *s_body, *s_more_body, *s_http_request, *s_start, *s_resp_body,
    *s_closed, *s_http, *s_closing, *s_server_line, *s_keep_alive, *s_method, *s_version, *s_head_method,
    *s_v10, *s_cycle, *s_send_slow, *s_receive_slow, *s_set_raw_head, *s_done, *s_link, *s_server, *s_stats,
    *s_active, *s_responses;
static PyObject *status_lines;
static PyObject *one;            /* 1 */   /* int -> bytes "HTTP/1.1 200 OK\r\n" (aem.http.protocol's) */
static PyObject *done_none;      /* an AsgiDone of None */
static PyTypeObject *AsgiDone_Type, *AsgiCycle_Type, *AsgiLink_Type, *LoopCore_T;

/* ---- AsgiDone: an awaitable whose result is there ------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *value;
} AsgiDoneObject;

static PyObject *done_new(PyObject *value) {
    AsgiDoneObject *d = PyObject_New(AsgiDoneObject, AsgiDone_Type);
    if (d) d->value = Py_NewRef(value);
    return (PyObject *)d;
}

static void done_dealloc(AsgiDoneObject *d) {
    PyTypeObject *tp = Py_TYPE(d);
    Py_DECREF(d->value);
    PyObject_Free(d);
    Py_DECREF(tp);
}

static PyObject *done_await(PyObject *d) { return Py_NewRef(d); }

static PySendResult done_am_send(PyObject *d, PyObject *arg, PyObject **result) {
    (void)arg;
    *result = Py_NewRef(((AsgiDoneObject *)d)->value);
    return PYGEN_RETURN;
}

/* StopIteration(value): the awaitable has returned value. */
static PyObject *done_next(PyObject *d) {
    PyObject *v = ((AsgiDoneObject *)d)->value;
    if (v != Py_None) {
        PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, v);
        if (!exc) return NULL;
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *done_send(PyObject *d, PyObject *arg) {
    (void)arg;
    return done_next(d);
}

static PyObject *done_throw(PyObject *d, PyObject *const *args, Py_ssize_t nargs) {
    (void)d;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "throw expected at least 1 argument");
        return NULL;
    }
    PyObject *e = args[0];
    if (PyExceptionInstance_Check(e)) PyErr_SetObject((PyObject *)Py_TYPE(e), e);
    else if (PyExceptionClass_Check(e)) PyErr_SetObject(e, nargs > 1 ? args[1] : NULL);
    else PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
    return NULL;
}

static PyObject *done_close(PyObject *d, PyObject *unused) {
    (void)d;
    (void)unused;
    Py_RETURN_NONE;
}

static PyMethodDef done_methods[] = {
    {"send", (PyCFunction)done_send, METH_O, "send(value): StopIteration with the result."},
    {"throw", (PyCFunction)(void (*)(void))done_throw, METH_FASTCALL, "throw(exc): raise it."},
    {"close", (PyCFunction)done_close, METH_NOARGS, "Nothing to close."},
    {NULL},
};

static PyType_Slot done_slots[] = {
    {Py_tp_dealloc, done_dealloc},
    {Py_am_await, done_await},
    {Py_am_send, done_am_send},
    {Py_tp_iter, done_await},
    {Py_tp_iternext, done_next},
    {Py_tp_methods, done_methods},
    {Py_tp_doc, "An awaitable whose result is already there (receive()/send() that need not wait)."},
    {0, NULL},
};

static PyType_Spec done_spec = {"aem._core.AsgiDone", sizeof(AsgiDoneObject), 0, Py_TPFLAGS_DEFAULT, done_slots};

/* ---- AsgiLink: a connection's held output ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *write;      /* transport.write */
    PyObject *core;       /* the loop's LoopCore (end-of-turn flushes), or NULL: written at once */
    PyObject *held;       /* bytes waiting for the end of the turn, or NULL */
    PyObject *responses;  /* the server's stats.responses (by status class) */
    PyObject *stats;      /* the server's stats (active) */
    PyObject *http;       /* the connection's aem.http.protocol.Connection */
    PyObject *server_line;  /* its Server line (bytes) */
    int log;              /* the server keeps an access log (the Python _done writes it) */
    int queued;           /* in the loop's flush queue */
} AsgiLinkObject;

static int link_flush(AsgiLinkObject *k) {
    PyObject *data = k->held;
    if (!data) return 0;
    k->held = NULL;
    PyObject *r = PyObject_CallOneArg(k->write, data);
    Py_DECREF(data);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* Hold data (a finished response) until the end of the turn. */
static int link_hold(AsgiLinkObject *k, PyObject *data) {
    if (k->held && link_flush(k) < 0) return -1;
    if (!k->core) {
        PyObject *r = PyObject_CallOneArg(k->write, data);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    if (!k->queued) {
        if (aem_loop_flush_later(k->core, (PyObject *)k) < 0) return -1;
        k->queued = 1;
    }
    k->held = Py_NewRef(data);
    return 0;
}

static PyObject *link_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *write, *core, *stats, *http;
    int log;
    static char *kwlist[] = {"write", "core", "stats", "log", "http", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOpO:AsgiLink", kwlist, &write, &core, &stats, &log, &http))
        return NULL;
    PyObject *server_line = PyObject_GetAttr(http, s_server_line);
    if (!server_line) return NULL;
    if (!PyBytes_CheckExact(server_line)) {
        Py_DECREF(server_line);
        PyErr_SetString(PyExc_TypeError, "http._server_line must be bytes");
        return NULL;
    }
    PyObject *responses = PyObject_GetAttr(stats, s_responses);
    if (!responses) {
        Py_DECREF(server_line);
        return NULL;
    }
    if (!PyList_CheckExact(responses) || PyList_GET_SIZE(responses) < 6) {
        Py_DECREF(responses);
        Py_DECREF(server_line);
        PyErr_SetString(PyExc_TypeError, "stats.responses must be a list of 6 counters");
        return NULL;
    }
    AsgiLinkObject *k = (AsgiLinkObject *)type->tp_alloc(type, 0);
    if (!k) {
        Py_DECREF(responses);
        Py_DECREF(server_line);
        return NULL;
    }
    k->write = Py_NewRef(write);
    k->core = Py_TYPE(core) == LoopCore_T ? Py_NewRef(core) : NULL;
    k->stats = Py_NewRef(stats);
    k->responses = responses;
    k->http = Py_NewRef(http);
    k->server_line = server_line;
    k->log = log;
    return (PyObject *)k;
}

static int link_traverse(AsgiLinkObject *k, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(k));
    Py_VISIT(k->write);
    Py_VISIT(k->core);
    Py_VISIT(k->held);
    Py_VISIT(k->responses);
    Py_VISIT(k->stats);
    Py_VISIT(k->http);
    return 0;
}

static int link_clear(AsgiLinkObject *k) {
    Py_CLEAR(k->write);
    Py_CLEAR(k->core);
    Py_CLEAR(k->held);
    Py_CLEAR(k->responses);
    Py_CLEAR(k->stats);
    Py_CLEAR(k->http);
    Py_CLEAR(k->server_line);
    return 0;
}

static void link_dealloc(AsgiLinkObject *k) {
    PyTypeObject *tp = Py_TYPE(k);
    PyObject_GC_UnTrack(k);
    link_clear(k);
    tp->tp_free(k);
    Py_DECREF(tp);
}

static PyObject *link_flush_py(AsgiLinkObject *k, PyObject *unused) {
    (void)unused;
    return link_flush(k) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *link_turn_end(AsgiLinkObject *k, PyObject *unused) {
    (void)unused;
    k->queued = 0;
    return link_flush(k) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *link_drop(AsgiLinkObject *k, PyObject *unused) {
    (void)unused;
    Py_CLEAR(k->held);
    Py_RETURN_NONE;
}

static PyMethodDef link_methods[] = {
    {"flush", (PyCFunction)link_flush_py, METH_NOARGS, "Write the held response now (output in order)."},
    {"_aem_flush", (PyCFunction)link_turn_end, METH_NOARGS, "The loop turn ends: write the held response."},
    {"drop", (PyCFunction)link_drop, METH_NOARGS, "The connection is gone: forget the held response."},
    {NULL},
};

static PyObject *link_held(AsgiLinkObject *k, void *unused) {
    (void)unused;
    return Py_NewRef(k->held ? k->held : Py_None);
}

static PyGetSetDef link_getset[] = {
    {"held", (getter)link_held, NULL, "The bytes waiting for the end of the loop turn, or None.", NULL},
    {NULL},
};

static PyType_Slot link_slots[] = {
    {Py_tp_new, link_new},
    {Py_tp_dealloc, link_dealloc},
    {Py_tp_traverse, link_traverse},
    {Py_tp_clear, link_clear},
    {Py_tp_methods, link_methods},
    {Py_tp_getset, link_getset},
    {Py_tp_doc, "AsgiLink(write, core, stats, log, http): a connection's output held to the end of the loop turn."},
    {0, NULL},
};

static PyType_Spec link_spec = {"aem._core.AsgiLink", sizeof(AsgiLinkObject), 0,
                                Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, link_slots};

/* ---- AsgiCycle ---------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *conn, *req, *body, *waiter, *want_length, *headers, *task;
    PyObject *raw_head;   /* the app's fields, when `fields` renders them (Python converts on demand) */
    PyObject *fields;     /* bytes: the header lines of the app's fields, or NULL */
    AsgiLinkObject *link;
    int status;
    char head_sent, response_done, request_read, chunked, body_sent;
    Py_ssize_t length, sent;
} AsgiCycleObject;

static int cycle_traverse(AsgiCycleObject *c, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(c));
    Py_VISIT(c->conn);
    Py_VISIT(c->req);
    Py_VISIT(c->body);
    Py_VISIT(c->waiter);
    Py_VISIT(c->want_length);
    Py_VISIT(c->headers);
    Py_VISIT(c->task);
    Py_VISIT(c->raw_head);
    Py_VISIT(c->link);
    return 0;
}

static int cycle_clear(AsgiCycleObject *c) {
    Py_CLEAR(c->conn);
    Py_CLEAR(c->req);
    Py_CLEAR(c->body);
    Py_CLEAR(c->waiter);
    Py_CLEAR(c->want_length);
    Py_CLEAR(c->headers);
    Py_CLEAR(c->task);
    Py_CLEAR(c->raw_head);
    Py_CLEAR(c->fields);
    Py_CLEAR(c->link);
    return 0;
}

static void cycle_dealloc(AsgiCycleObject *c) {
    PyTypeObject *tp = Py_TYPE(c);
    PyObject_GC_UnTrack(c);
    cycle_clear(c);
    tp->tp_free(c);
    Py_DECREF(tp);
}

static void set_obj(PyObject **slot, PyObject *v) {
    PyObject *old = *slot;
    *slot = Py_XNewRef(v);
    Py_XDECREF(old);
}

/* _setup(conn, req, body): a new exchange on conn (the Python half's __init__ calls it). */
static PyObject *cycle_setup(AsgiCycleObject *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_setup(conn, req, body)");
        return NULL;
    }
    PyObject *conn = args[0], *req = args[1], *body = args[2];
    PyObject *link = PyObject_GetAttr(conn, s_link);
    if (!link) return NULL;
    if (Py_TYPE(link) != AsgiLink_Type) {
        Py_DECREF(link);
        PyErr_SetString(PyExc_TypeError, "conn.link must be an AsgiLink");
        return NULL;
    }
    Py_XSETREF(c->link, (AsgiLinkObject *)link);
    set_obj(&c->conn, conn);
    set_obj(&c->req, req);
    set_obj(&c->body, body);
    if (body != Py_None && PyObject_SetAttr(body, s_cycle, (PyObject *)c) < 0) return NULL;
    set_obj(&c->task, Py_None);
    set_obj(&c->waiter, Py_None);
    set_obj(&c->want_length, Py_None);
    PyObject *headers = PyList_New(0);
    if (!headers) return NULL;
    Py_XSETREF(c->headers, headers);
    Py_CLEAR(c->raw_head);
    Py_CLEAR(c->fields);
    c->status = 0;
    c->head_sent = c->response_done = c->request_read = c->chunked = c->body_sent = 0;
    c->length = c->sent = 0;
    /* stats.active += 1 */
    PyObject *stats = c->link->stats;
    PyObject *n = PyObject_GetAttr(stats, s_active);
    if (!n) return NULL;
    PyObject *n1 = PyNumber_Add(n, one);
    Py_DECREF(n);
    if (!n1) return NULL;
    int rc = PyObject_SetAttr(stats, s_active, n1);
    Py_DECREF(n1);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* receive(): the whole body, if the request came with it and nothing read it yet. */
static PyObject *cycle_receive(AsgiCycleObject *c, PyObject *unused) {
    (void)unused;
    if (c->request_read || c->body != Py_None || !c->req) return PyObject_CallMethodNoArgs((PyObject *)c, s_receive_slow);
    PyObject *data = PyObject_GetAttr(c->req, s_body);
    if (!data) return NULL;
    PyObject *msg = PyDict_New();
    if (!msg || PyDict_SetItem(msg, s_type, s_http_request) < 0 || PyDict_SetItem(msg, s_body, data) < 0 ||
        PyDict_SetItem(msg, s_more_body, Py_False) < 0) {
        Py_XDECREF(msg);
        Py_DECREF(data);
        return NULL;
    }
    Py_DECREF(data);
    c->request_read = 1;
    PyObject *d = done_new(msg);
    Py_DECREF(msg);
    return d;
}

/* 1 if the attribute is true, 0 if not, -1 on error. */
static int attr_true(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static int lower_eq(const char *s, Py_ssize_t n, const char *lit) {
    if ((size_t)n != strlen(lit)) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char ch = s[i];
        if (ch >= 'A' && ch <= 'Z') ch = (char)(ch + 32);
        if (ch != lit[i]) return 0;
    }
    return 1;
}

/* The fields the server frames itself (aem.http.asgi._STRIP); content-length is 2. */
static int framed(const char *n, Py_ssize_t len) {
    switch (len) {
    case 4: return lower_eq(n, len, "date");
    case 6: return lower_eq(n, len, "server");
    case 10: return lower_eq(n, len, "connection") || lower_eq(n, len, "keep-alive");
    case 14: return lower_eq(n, len, "content-length") ? 2 : 0;
    case 17: return lower_eq(n, len, "transfer-encoding");
    default: return 0;
    }
}

/* The app's fields as header lines: 1 (fields, *want set: NULL or the Content-Length), 0 when
 * the Python half has to decide (an unusual pair, a bad byte, an odd Content-Length), -1. */
static int render_fields(PyObject *headers, PyObject **fields, PyObject **want) {
    *fields = NULL;
    *want = NULL;
    PyObject *seq;
    if (PyList_CheckExact(headers) || PyTuple_CheckExact(headers)) seq = headers;
    else return 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = items[i];
        if (!PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) != 2) return 0;
        PyObject *k = PyTuple_GET_ITEM(p, 0), *v = PyTuple_GET_ITEM(p, 1);
        if (!PyBytes_CheckExact(k) || !PyBytes_CheckExact(v)) return 0;
        const char *kn = PyBytes_AS_STRING(k), *vn = PyBytes_AS_STRING(v);
        Py_ssize_t kl = PyBytes_GET_SIZE(k), vl = PyBytes_GET_SIZE(v);
        if (!kl || memchr(kn, ':', (size_t)kl) || memchr(kn, '\r', (size_t)kl) || memchr(kn, '\n', (size_t)kl) ||
            memchr(vn, '\r', (size_t)vl) || memchr(vn, '\n', (size_t)vl))
            return 0;
        int f = framed(kn, kl);
        if (f == 2) {
            if (vl < 1 || vl > 18) return 0;
            long long x = 0;
            for (Py_ssize_t j = 0; j < vl; j++) {
                if (vn[j] < '0' || vn[j] > '9') return 0;
                x = x * 10 + (vn[j] - '0');
            }
            PyObject *w = PyLong_FromLongLong(x);
            if (!w) return -1;
            Py_XSETREF(*want, w);
        }
        if (!f) total += kl + vl + 4;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) {
        Py_CLEAR(*want);
        return -1;
    }
    char *o = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PyTuple_GET_ITEM(items[i], 0), *v = PyTuple_GET_ITEM(items[i], 1);
        Py_ssize_t kl = PyBytes_GET_SIZE(k), vl = PyBytes_GET_SIZE(v);
        if (framed(PyBytes_AS_STRING(k), kl)) continue;
        memcpy(o, PyBytes_AS_STRING(k), (size_t)kl);
        o += kl;
        *o++ = ':';
        *o++ = ' ';
        memcpy(o, PyBytes_AS_STRING(v), (size_t)vl);
        o += vl;
        *o++ = '\r';
        *o++ = '\n';
    }
    *fields = out;
    return 1;
}

/* "Date: Tue, 15 Nov 1994 08:12:31 GMT\r\n", as email.utils.formatdate(usegmt=True) writes it. */
static time_t date_sec = -1;
static char date_line[64];
static size_t date_len;

static void refresh_date(void) {
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    if (now == date_sec) return;
    struct tm tm;
    gmtime_r(&now, &tm);
    date_len = (size_t)snprintf(date_line, sizeof date_line, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                                days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour,
                                tm.tm_min, tm.tm_sec);
    date_sec = now;
}

/* http.response.start: 1 done here, 0 for the Python half, -1 error. */
static int start_fast(AsgiCycleObject *c, PyObject *msg) {
    if (c->status) return 0;
    PyObject *st = PyDict_GetItemWithError(msg, s_status);
    if (!st) return PyErr_Occurred() ? -1 : 0;
    if (!PyLong_CheckExact(st)) return 0;
    long status = PyLong_AsLong(st);
    if (status == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (status < 100 || status > 599) return 0;
    PyObject *headers = PyDict_GetItemWithError(msg, s_headers);
    if (!headers) {
        if (PyErr_Occurred()) return -1;
        headers = PyTuple_New(0);   /* the empty tuple: immortal enough, shared */
        if (!headers) return -1;
        Py_DECREF(headers);
    }
    PyObject *fields, *want;
    int r = render_fields(headers, &fields, &want);
    if (r <= 0) return r;
    c->status = (int)status;
    Py_XSETREF(c->fields, fields);
    set_obj(&c->raw_head, headers);
    Py_XSETREF(c->want_length, want ? want : Py_NewRef(Py_None));
    return 1;
}

static PyObject *status_line(int status) {
    PyObject *key = PyLong_FromLong(status);
    if (!key) return NULL;
    PyObject *line = PyDict_GetItemWithError(status_lines, key);
    Py_DECREF(key);
    if (line) return Py_NewRef(line);
    if (PyErr_Occurred()) return NULL;
    return PyBytes_FromFormat("HTTP/1.1 %d Unknown\r\n", status);
}

/* http.response.body, the whole body at once: 1 answered here, 0 for the Python half, -1. */
static int body_fast(AsgiCycleObject *c, PyObject *msg) {
    if (!c->status || c->response_done || c->head_sent || !c->fields || c->body != Py_None) return 0;
    PyObject *body = PyDict_GetItemWithError(msg, s_body);
    if (!body) {
        if (PyErr_Occurred()) return -1;
        body = Py_None;
    }
    if (body != Py_None && !PyBytes_CheckExact(body)) return 0;
    PyObject *more = PyDict_GetItemWithError(msg, s_more_body);
    if (more && more != Py_False) {
        int t = PyObject_IsTrue(more);
        if (t) return t < 0 ? -1 : 0;
    } else if (!more && PyErr_Occurred()) {
        return -1;
    }
    Py_ssize_t n = body == Py_None ? 0 : PyBytes_GET_SIZE(body);
    if (c->want_length != Py_None) {
        Py_ssize_t want = PyLong_AsSsize_t(c->want_length);
        if (want == -1 && PyErr_Occurred()) return -1;
        if (want != n) return 0;
    }
    PyObject *req = c->req;
    PyObject *method = PyObject_GetAttr(req, s_method);
    if (!method) return -1;
    int head = PyUnicode_Check(method) && PyUnicode_Compare(method, s_head_method) == 0;
    Py_DECREF(method);
    if (head) return 0;
    AsgiLinkObject *k = c->link;
    PyObject *http = k->http, *server_line = k->server_line;
    int rc = -1;
    PyObject *sline = NULL, *version = NULL, *out = NULL;
    int keep = attr_true(req, s_keep_alive);
    if (keep < 0) goto done;
    if (keep) {
        int closing = attr_true(http, s_closing);
        if (closing < 0) goto done;
        keep = !closing;
    }
    if (!keep && PyObject_SetAttr(http, s_closing, Py_True) < 0) goto done;
    version = PyObject_GetAttr(req, s_version);
    if (!version) goto done;
    int v10 = PyUnicode_Check(version) && PyUnicode_Compare(version, s_v10) == 0;
    if (!(sline = status_line(c->status))) goto done;
    refresh_date();
    int status = c->status;
    int no_length = status < 200 || status == 204 || status == 304;
    int send_body = status >= 200 && status != 204 && status != 304 && n;
    char tail[48];
    size_t tn = 0;
    if (!no_length) {   /* "Content-Length: %zd\r\n" */
        char digits[24];
        int nd = 0;
        size_t x = (size_t)n;
        do digits[nd++] = (char)('0' + x % 10);
        while ((x /= 10));
        memcpy(tail, "Content-Length: ", 16);
        tn = 16;
        while (nd) tail[tn++] = digits[--nd];
        tail[tn++] = '\r';
        tail[tn++] = '\n';
    }
    const char *conn_line = !keep ? "Connection: close\r\n\r\n" : v10 ? "Connection: keep-alive\r\n\r\n" : "\r\n";
    size_t cl = strlen(conn_line);
    Py_ssize_t ns = PyBytes_GET_SIZE(sline), nv = PyBytes_GET_SIZE(server_line), nf = PyBytes_GET_SIZE(c->fields);
    Py_ssize_t total = ns + nv + (Py_ssize_t)date_len + nf + (Py_ssize_t)(tn + cl) + (send_body ? n : 0);
    out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) goto done;
    char *o = PyBytes_AS_STRING(out);
    memcpy(o, PyBytes_AS_STRING(sline), (size_t)ns);
    o += ns;
    memcpy(o, PyBytes_AS_STRING(server_line), (size_t)nv);
    o += nv;
    memcpy(o, date_line, date_len);
    o += date_len;
    memcpy(o, PyBytes_AS_STRING(c->fields), (size_t)nf);
    o += nf;
    memcpy(o, tail, tn);
    o += tn;
    memcpy(o, conn_line, cl);
    o += cl;
    if (send_body) memcpy(o, PyBytes_AS_STRING(body), (size_t)n);
    c->head_sent = 1;
    if (link_hold(k, out) < 0) goto done;
    if (k->log || c->waiter != Py_None) {  /* the access log, a receive() waiting: the Python _done */
        PyObject *len = PyLong_FromSsize_t(n);
        if (!len) goto done;
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)c, s_done, len);
        Py_DECREF(len);
        if (!r) goto done;
        Py_DECREF(r);
    } else {
        c->response_done = 1;
        Py_ssize_t cls = status / 100;
        PyObject *cnt = PyList_GET_ITEM(k->responses, cls);
        PyObject *cnt1 = PyNumber_Add(cnt, one);
        if (!cnt1) goto done;
        PyList_SetItem(k->responses, cls, cnt1);
    }
    rc = 1;
done:
    Py_XDECREF(version);
    Py_XDECREF(sline);
    Py_XDECREF(out);
    return rc;
}

static PyObject *cycle_send(AsgiCycleObject *c, PyObject *msg) {
    if (PyDict_CheckExact(msg) && c->conn) {
        PyObject *kind = PyDict_GetItemWithError(msg, s_type);
        if (kind && PyUnicode_CheckExact(kind)) {
            int closed = attr_true(c->conn, s_closed);
            if (closed < 0) return NULL;
            int r = 0;
            if (closed) r = 1;  /* the client is gone: nothing goes out (the Python half's rule too) */
            else if (kind == s_resp_body || PyUnicode_Compare(kind, s_resp_body) == 0) r = body_fast(c, msg);
            else if (kind == s_start || PyUnicode_Compare(kind, s_start) == 0) r = start_fast(c, msg);
            if (r < 0) return NULL;
            if (r) return Py_NewRef(done_none);
        } else if (!kind && PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyObject_CallMethodOneArg((PyObject *)c, s_send_slow, msg);
}

/* _take_raw_head(): the app's fields as sent with http.response.start, if only the C half
 * has read them (then the Python half converts them), else None. */
static PyObject *cycle_take_raw_head(AsgiCycleObject *c, PyObject *unused) {
    (void)unused;
    PyObject *h = c->raw_head;
    c->raw_head = NULL;
    Py_CLEAR(c->fields);
    return h ? h : Py_NewRef(Py_None);
}

static PyMethodDef cycle_methods[] = {
    {"_setup", (PyCFunction)(void (*)(void))cycle_setup, METH_FASTCALL, "_setup(conn, req, body): a new exchange."},
    {"receive", (PyCFunction)cycle_receive, METH_NOARGS, "ASGI receive(): an awaitable of the next message."},
    {"send", (PyCFunction)cycle_send, METH_O, "ASGI send(message): an awaitable."},
    {"_take_raw_head", (PyCFunction)cycle_take_raw_head, METH_NOARGS,
     "The app's response fields only the C half read (None if none)."},
    {NULL},
};

#define M(name, type, field) {name, type, offsetof(AsgiCycleObject, field), 0, NULL}
static PyMemberDef cycle_members[] = {
    M("conn", T_OBJECT, conn),
    M("req", T_OBJECT, req),
    M("body", T_OBJECT, body),
    M("waiter", T_OBJECT, waiter),
    M("want_length", T_OBJECT, want_length),
    M("headers", T_OBJECT, headers),
    M("task", T_OBJECT, task),
    M("status", T_INT, status),
    M("head_sent", T_BOOL, head_sent),
    M("response_done", T_BOOL, response_done),
    M("request_read", T_BOOL, request_read),
    M("chunked", T_BOOL, chunked),
    M("body_sent", T_BOOL, body_sent),
    M("length", T_PYSSIZET, length),
    M("sent", T_PYSSIZET, sent),
    {NULL},
};
#undef M

static PyObject *cycle_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    AsgiCycleObject *c = (AsgiCycleObject *)type->tp_alloc(type, 0);
    if (!c) return NULL;
    c->body = Py_NewRef(Py_None);
    c->waiter = Py_NewRef(Py_None);
    c->want_length = Py_NewRef(Py_None);
    c->task = Py_NewRef(Py_None);
    return (PyObject *)c;
}

static PyType_Slot cycle_slots[] = {
    {Py_tp_new, cycle_new},
    {Py_tp_dealloc, cycle_dealloc},
    {Py_tp_traverse, cycle_traverse},
    {Py_tp_clear, cycle_clear},
    {Py_tp_methods, cycle_methods},
    {Py_tp_members, cycle_members},
    {Py_tp_doc, "The C base of aem.http.asgi._Cycle: one request's state, receive() and send()."},
    {0, NULL},
};

static PyType_Spec cycle_spec = {"aem._core.AsgiCycle", sizeof(AsgiCycleObject), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, cycle_slots};

/* asgi_configure(status_lines): the status lines the responses begin with (int -> bytes). */
static PyObject *asgi_configure(PyObject *module, PyObject *lines) {
    (void)module;
    if (!PyDict_Check(lines)) {
        PyErr_SetString(PyExc_TypeError, "asgi_configure(status_lines: dict)");
        return NULL;
    }
    Py_XSETREF(status_lines, Py_NewRef(lines));
    Py_RETURN_NONE;
}

static PyMethodDef asgi_functions[] = {
    {"asgi_configure", asgi_configure, METH_O, "asgi_configure(status_lines): set once by aem.http.asgi."},
    {NULL},
};

int aem_asgi_init(PyObject *module) {
    struct {
        PyObject **var;
        const char *s;
    } names[] = {
        {&s_type, "type"}, {&s_status, "status"}, {&s_headers, "headers"}, {&s_body, "body"},
        {&s_more_body, "more_body"}, {&s_http_request, "http.request"}, {&s_start, "http.response.start"},
        {&s_resp_body, "http.response.body"}, {&s_closed, "closed"}, {&s_http, "http"}, {&s_closing, "closing"},
        {&s_server_line, "_server_line"}, {&s_keep_alive, "keep_alive"}, {&s_method, "method"},
        {&s_version, "version"}, {&s_head_method, "HEAD"}, {&s_v10, "1.0"}, {&s_cycle, "cycle"},
        {&s_send_slow, "_send_slow"}, {&s_receive_slow, "_receive_slow"}, {&s_set_raw_head, "_set_raw_head"},
        {&s_done, "_done"}, {&s_link, "link"}, {&s_server, "server"}, {&s_stats, "stats"},
        {&s_active, "active"}, {&s_responses, "responses"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].var = PyUnicode_InternFromString(names[i].s))) return -1;
    if (!(status_lines = PyDict_New()) || !(one = PyLong_FromLong(1))) return -1;
    LoopCore_T = (PyTypeObject *)PyObject_GetAttrString(module, "LoopCore");
    if (!LoopCore_T) return -1;
    AsgiDone_Type = (PyTypeObject *)PyType_FromSpec(&done_spec);
    AsgiLink_Type = (PyTypeObject *)PyType_FromSpec(&link_spec);
    AsgiCycle_Type = (PyTypeObject *)PyType_FromSpec(&cycle_spec);
    if (!AsgiDone_Type || !AsgiLink_Type || !AsgiCycle_Type) return -1;
    if (!(done_none = done_new(Py_None))) return -1;
    if (PyModule_AddObjectRef(module, "AsgiDone", (PyObject *)AsgiDone_Type) < 0 ||
        PyModule_AddObjectRef(module, "AsgiLink", (PyObject *)AsgiLink_Type) < 0 ||
        PyModule_AddObjectRef(module, "AsgiCycle", (PyObject *)AsgiCycle_Type) < 0)
        return -1;
    return PyModule_AddFunctions(module, asgi_functions);
}
