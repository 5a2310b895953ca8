/* http_status.c — /_aem/status?format=json answered by AEMhttpd's fast path, with no Python.
 *
 * The page's JSON (aem.http.status.render_json of status.collect(server.stats(), pool)) is
 * put together here from two kinds of parts:
 *
 *   - the server's counters ("server") and the time ("time"), rendered here at each
 *     request, from the values the server keeps (its __dict__, _by_class, _conns) plus
 *     what this batch has answered so far — as HTTPServer.stats() would give them;
 *   - everything else (engine, capsules, vmtable, pid), which only Python knows: rendered
 *     by the glue into three pieces of JSON text (HttpFast.set_status) around the two
 *     live values, on the server's periodic tick while the page is being asked for.
 *
 * A request is answered here only when the glue said who may see the page (mode), the
 * client is one of them, and the snapshot is at most max_age seconds old; anything else
 * (no snapshot, a stale one, an address this file does not read, a counter that is not a
 * plain int) is deferred to the full path, which renders the page and a fresh snapshot. */
#include "pyaem.h"
#include "http_fast.h"

#include <arpa/inet.h>
#include <string.h>
#include <time.h>

#define STATUS_TARGET "/_aem/status?format=json"

static PyObject *s_accept_pauses, *s_accepted, *s_app_errors, *s_bytes_out, *s_resets, *s_conns,
    *s_requests, *s_timeouts_fired, *s_started_at;

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* True when addr is a client the loopback mode shows the page to (as server._is_loopback:
 * not a tuple — a Unix socket — or 127.0.0.0/8 or ::1); 0 when it is not, or not sure. */
static int loopback(PyObject *addr) {
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) == 0) return 1;
    PyObject *host = PyTuple_GET_ITEM(addr, 0);
    if (!PyUnicode_Check(host)) return 0;
    const char *s = PyUnicode_AsUTF8(host);
    if (!s) {
        PyErr_Clear();
        return 0;
    }
    unsigned char a[16];
    if (inet_pton(AF_INET, s, a) == 1) return a[0] == 127;
    if (inet_pton(AF_INET6, s, a) == 1) {
        static const unsigned char one[16] = {[15] = 1};
        return memcmp(a, one, 16) == 0;
    }
    return 0;
}

static int put(HttpFastObject *self, const char *s, size_t n) {
    if (aem_http_reserve(&self->status_body, &self->status_cap, self->status_len, n) < 0) return -1;
    memcpy(self->status_body + self->status_len, s, n);
    self->status_len += n;
    return 0;
}

static int put_bytes(HttpFastObject *self, PyObject *b) {
    return put(self, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
}

/* "key": value, for an exact int in the server's __dict__ (plus add).  0 when the value
 * is not a plain int (the full path renders it). */
static int put_counter(HttpFastObject *self, const char *key, PyObject *name, long long add) {
    PyObject *v = PyDict_GetItemWithError(self->server_dict, name);
    if (!v || !PyLong_CheckExact(v)) return PyErr_Occurred() ? -1 : 0;
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (n == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    char buf[96];
    int len = snprintf(buf, sizeof buf, "\"%s\": %lld, ", key, n + add);
    return put(self, buf, (size_t)len) < 0 ? -1 : 1;
}

/* A float as repr() (and so json.dumps) writes it. */
static int put_float(HttpFastObject *self, double x) {
    char *s = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (!s) return -1;
    int rc = put(self, s, strlen(s));
    PyMem_Free(s);
    return rc;
}

/* round(x, 1), as float.__round__ does it: the correctly rounded decimal, read back. */
static int round1(double x, double *out) {
    char *s = PyOS_double_to_string(x, 'f', 1, 0, NULL);
    if (!s) return -1;
    *out = PyOS_string_to_double(s, NULL, NULL);
    PyMem_Free(s);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* The "server" section, as json.dumps(HTTPServer.stats(), sort_keys=True).  1, 0 (not
 * plain: defer) or -1. */
static int put_server(HttpFastObject *self, size_t nreq, size_t sent, double now) {
    int rc;
#define COUNTER(key, name, add) \
    if ((rc = put_counter(self, key, name, (long long)(add))) <= 0) return rc
    if (put(self, "{", 1) < 0) return -1;
    COUNTER("accept_pauses", s_accept_pauses, 0);
    COUNTER("accepted", s_accepted, 0);
    COUNTER("app_errors", s_app_errors, 0);
    COUNTER("bytes_out", s_bytes_out, sent);
    COUNTER("client_resets", s_resets, 0);
    PyObject *conns = PyDict_GetItemWithError(self->server_dict, s_conns);
    if (!conns || !PyAnySet_CheckExact(conns)) return PyErr_Occurred() ? -1 : 0;
    char buf[96];
    int n = snprintf(buf, sizeof buf, "\"connections\": %zd, ", PySet_GET_SIZE(conns));
    if (put(self, buf, (size_t)n) < 0) return -1;
    COUNTER("requests", s_requests, nreq);
    if (!PyList_CheckExact(self->by_class)) return 0;
    if (put(self, "\"responses\": {", 14) < 0) return -1;
    int first = 1;
    for (Py_ssize_t i = 1; i < PyList_GET_SIZE(self->by_class); i++) {
        PyObject *v = PyList_GET_ITEM(self->by_class, i);
        if (!PyLong_CheckExact(v)) return 0;
        long long c = PyLong_AsLongLong(v);
        if (c == -1 && PyErr_Occurred()) return -1;
        if (!c) continue;
        n = snprintf(buf, sizeof buf, "%s\"%zdxx\": %lld", first ? "" : ", ", i, c);
        if (put(self, buf, (size_t)n) < 0) return -1;
        first = 0;
    }
    if (put(self, "}, ", 3) < 0) return -1;
    COUNTER("timeouts", s_timeouts_fired, 0);
#undef COUNTER
    PyObject *started = PyDict_GetItemWithError(self->server_dict, s_started_at);
    if (!started || !PyFloat_CheckExact(started)) return PyErr_Occurred() ? -1 : 0;
    double up;
    if (round1(now - PyFloat_AS_DOUBLE(started), &up) < 0) return -1;
    if (put(self, "\"uptime_s\": ", 12) < 0 || put_float(self, up) < 0 || put(self, "}", 1) < 0) return -1;
    return 1;
}

int aem_http_status_json(HttpFastObject *self, const char *target, size_t ntarget, PyObject *addr,
                         int head_only, size_t nreq, size_t sent, double now, size_t *length) {
    if (!self->status_mode || !self->status_head || !self->server_dict) return 0;
    if (ntarget != sizeof STATUS_TARGET - 1 || memcmp(target, STATUS_TARGET, ntarget) != 0) return 0;
    if (self->status_mode == 2 && !loopback(addr)) return 0;
    if (mono_now() - self->status_taken > self->status_max_age) return 0;
    self->status_len = 0;
    if (put_bytes(self, self->status_head) < 0) return -1;
    int rc = put_server(self, nreq, sent, now);
    if (rc <= 0) return rc;
    if (put_bytes(self, self->status_mid) < 0 || put_float(self, now) < 0 ||
        put_bytes(self, self->status_tail) < 0)
        return -1;
    /* the head, as protocol.Connection.response writes it for this kept-alive 1.1 answer */
    static const char fields[] = "Content-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: ";
    size_t nb = self->status_len, ns = (size_t)PyBytes_GET_SIZE(self->server_line);
    if (aem_http_reserve(&self->out, &self->out_cap, self->out_len,
                         17 + ns + self->date_len + sizeof fields + 24 + (head_only ? 0 : nb)) < 0)
        return -1;
    char *o = self->out + self->out_len;
    memcpy(o, "HTTP/1.1 200 OK\r\n", 17);
    o += 17;
    memcpy(o, PyBytes_AS_STRING(self->server_line), ns);
    o += ns;
    memcpy(o, self->date, self->date_len);
    o += self->date_len;
    memcpy(o, fields, sizeof fields - 1);
    o += sizeof fields - 1;
    o += snprintf(o, 24, "%zu\r\n\r\n", nb);
    if (!head_only) {
        memcpy(o, self->status_body, nb);
        o += nb;
    }
    self->out_len = (size_t)(o - self->out);
    self->status_served++;
    *length = nb;
    return 200;
}

PyObject *aem_http_set_status_method(HttpFastObject *self, PyObject *args) {
    int mode;
    PyObject *head, *mid, *tail;
    double taken, max_age;
    if (!PyArg_ParseTuple(args, "iSSSdd:set_status", &mode, &head, &mid, &tail, &taken, &max_age))
        return NULL;
    if (mode < 0 || mode > 2) {
        PyErr_SetString(PyExc_ValueError, "set_status: mode is 0 (off), 1 (everyone) or 2 (loopback)");
        return NULL;
    }
    self->status_mode = mode;
    Py_XSETREF(self->status_head, Py_NewRef(head));
    Py_XSETREF(self->status_mid, Py_NewRef(mid));
    Py_XSETREF(self->status_tail, Py_NewRef(tail));
    self->status_taken = taken;
    self->status_max_age = max_age;
    Py_RETURN_NONE;
}

int aem_http_status_init(void) {
#define INTERN(var, s) if (!(var = PyUnicode_InternFromString(s))) return -1
    INTERN(s_accept_pauses, "accept_pauses");
    INTERN(s_accepted, "accepted");
    INTERN(s_app_errors, "app_errors");
    INTERN(s_bytes_out, "bytes_out");
    INTERN(s_resets, "resets");
    INTERN(s_conns, "_conns");
    INTERN(s_requests, "requests");
    INTERN(s_timeouts_fired, "timeouts_fired");
    INTERN(s_started_at, "started_at");
#undef INTERN
    return 0;
}
