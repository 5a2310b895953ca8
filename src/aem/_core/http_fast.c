/* http_fast.c — aem._core.HttpFast: AEMhttpd's native per-request path.
 *
 * HttpFast.serve(conn, data) answers the simple requests at the start of
 * data (http_parse.h) without the full parser: the app is called once with a
 * ready Request and its Response is serialised here; a small file of the
 * server's file cache is answered from memory; the output of the batch leaves
 * in one send().  It stops at the first request it does not fully understand
 * and returns the bytes from there on, for the full path (httptools).  What
 * needs Python after the app ran (an exception, an unusual result, a cache
 * miss, a send that would block) is handed to the glue's slow(), in
 * src/aem/http/fast.py, which answers it the full path's way.  The engine runs
 * the same code inside aem.Read's delivery: http_hook.c.
 */
#include "pyaem.h"
#include "http_fast.h"
#include "http_parse.h"

#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define HIGH_WATER (64 * 1024)   /* as the server: flush a batch past this */
#define SMALL_BODY 16384


/* The offset of a plain __slots__ attribute of tp (read and written in place), or -1. */
Py_ssize_t aem_slot_offset(PyTypeObject *tp, PyObject *name) {
    PyObject *d = _PyType_Lookup(tp, name);
    if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type)) return -1;
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    return m->type == T_OBJECT_EX && !(m->flags & READONLY) ? m->offset : -1;
}

static PyObject *str_fd, *str_addr, *str_status, *str_headers, *str_body, *str_requests, *str_bytes_out;

int aem_http_reserve(char **buf, size_t *cap, size_t len, size_t n) {
    if (*cap - len >= n) return 0;
    size_t c = *cap ? *cap : 16384;
    while (c - len < n) c *= 2;
    char *p = PyMem_Realloc(*buf, c);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = p;
    *cap = c;
    return 0;
}

static int out_reserve(HttpFastObject *self, size_t n) {
    return aem_http_reserve(&self->out, &self->out_cap, self->out_len, n);
}

static void out_put(HttpFastObject *self, const void *data, size_t n) {
    memcpy(self->out + self->out_len, data, n);
    self->out_len += n;
}

/* "Date: Tue, 15 Nov 1994 08:12:31 GMT\r\n", as email.utils.formatdate(usegmt=True) writes it. */
static void refresh_date(HttpFastObject *self) {
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    if (now == self->date_sec) return;
    struct tm tm;
    gmtime_r(&now, &tm);
    self->date_len = (size_t)snprintf(self->date, sizeof self->date,
                                      "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n", days[tm.tm_wday],
                                      tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour,
                                      tm.tm_min, tm.tm_sec);
    self->date_sec = now;
}

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A cache entry (expiry, head_rest, body): head_rest follows the status, Server and Date
 * lines.  1 when answered, 0 when there is no fresh entry, -1 on error. */
static int emit_cached(HttpFastObject *self, PyObject *target, int head_only, double now, size_t *length) {
    PyObject *entry = PyDict_GetItemWithError(self->cache, target);
    if (!entry) return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) return 0;
    PyObject *exp = PyTuple_GET_ITEM(entry, 0), *rest = PyTuple_GET_ITEM(entry, 1);
    PyObject *body = PyTuple_GET_ITEM(entry, 2);
    if (!PyFloat_CheckExact(exp) || PyFloat_AS_DOUBLE(exp) <= now || !PyBytes_CheckExact(rest) ||
        !PyBytes_CheckExact(body))
        return 0;
    *length = (size_t)PyBytes_GET_SIZE(body);
    size_t nb = head_only ? 0 : *length;
    size_t ns = (size_t)PyBytes_GET_SIZE(self->server_line), nr = (size_t)PyBytes_GET_SIZE(rest);
    if (out_reserve(self, 17 + ns + self->date_len + nr + nb) < 0) return -1;
    out_put(self, "HTTP/1.1 200 OK\r\n", 17);
    out_put(self, PyBytes_AS_STRING(self->server_line), ns);
    out_put(self, self->date, self->date_len);
    out_put(self, PyBytes_AS_STRING(rest), nr);
    out_put(self, PyBytes_AS_STRING(body), nb);
    return 1;
}

/* One header field of a Response, if render_head would write it as it is: an exact
 * (str, str) pair, latin-1, a non-empty name without ":", no CR or LF anywhere. */
static int field_ok(PyObject *item, const char **name, Py_ssize_t *nn, const char **value,
                    Py_ssize_t *nv) {
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) return 0;
    PyObject *k = PyTuple_GET_ITEM(item, 0), *v = PyTuple_GET_ITEM(item, 1);
    if (!PyUnicode_CheckExact(k) || !PyUnicode_CheckExact(v) || PyUnicode_KIND(k) != PyUnicode_1BYTE_KIND ||
        PyUnicode_KIND(v) != PyUnicode_1BYTE_KIND)
        return 0;
    *name = (const char *)PyUnicode_1BYTE_DATA(k);
    *nn = PyUnicode_GET_LENGTH(k);
    *value = (const char *)PyUnicode_1BYTE_DATA(v);
    *nv = PyUnicode_GET_LENGTH(v);
    if (*nn == 0 || memchr(*name, ':', (size_t)*nn) || memchr(*name, '\r', (size_t)*nn) ||
        memchr(*name, '\n', (size_t)*nn) || memchr(*value, '\r', (size_t)*nv) ||
        memchr(*value, '\n', (size_t)*nv))
        return 0;
    return 1;
}

/* Serialise an app's Response as the full path does for a kept-alive HTTP/1.1 request.
 * The status; 0 when it is not a plain case (the glue answers it); -1 on error. */
static PyObject *resp_get(HttpFastObject *self, PyObject *resp, int i, PyObject *name) {
    if (self->resp_off[i] < 0) return PyObject_GetAttr(resp, name);
    PyObject *v = *(PyObject **)((char *)resp + self->resp_off[i]);
    if (!v) PyErr_SetObject(PyExc_AttributeError, name);
    return Py_XNewRef(v);
}

static int emit_response(HttpFastObject *self, PyObject *resp, int head_only, size_t *length) {
    PyObject *status = resp_get(self, resp, 0, str_status);
    PyObject *headers = status ? resp_get(self, resp, 1, str_headers) : NULL;
    PyObject *body = headers ? resp_get(self, resp, 2, str_body) : NULL;
    int rc = -1;
    if (!body) goto done;
    rc = 0;
    if (!PyLong_CheckExact(status) || !PyList_CheckExact(headers) || !PyBytes_CheckExact(body)) goto done;
    long st = PyLong_AsLong(status);
    if (st < 200 || st > 599 || st == 204 || st == 304) goto done;
    PyObject *line = PyDict_GetItemWithError(self->status_lines, status);
    if (!line) {
        rc = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    if (!PyBytes_CheckExact(line)) goto done;
    Py_ssize_t nh = PyList_GET_SIZE(headers);
    size_t need = (size_t)PyBytes_GET_SIZE(line) + (size_t)PyBytes_GET_SIZE(self->server_line) +
                  self->date_len + 40;
    for (Py_ssize_t i = 0; i < nh; i++) {
        const char *k, *v;
        Py_ssize_t nk, nv;
        if (!field_ok(PyList_GET_ITEM(headers, i), &k, &nk, &v, &nv)) goto done;
        need += (size_t)(nk + nv + 4);
    }
    size_t nb = (size_t)PyBytes_GET_SIZE(body);
    *length = nb;
    if (out_reserve(self, need + (head_only ? 0 : nb)) < 0) {
        rc = -1;
        goto done;
    }
    out_put(self, PyBytes_AS_STRING(line), (size_t)PyBytes_GET_SIZE(line));
    out_put(self, PyBytes_AS_STRING(self->server_line), (size_t)PyBytes_GET_SIZE(self->server_line));
    out_put(self, self->date, self->date_len);
    for (Py_ssize_t i = 0; i < nh; i++) {
        const char *k, *v;
        Py_ssize_t nk, nv;
        field_ok(PyList_GET_ITEM(headers, i), &k, &nk, &v, &nv);
        out_put(self, k, (size_t)nk);
        out_put(self, ": ", 2);
        out_put(self, v, (size_t)nv);
        out_put(self, "\r\n", 2);
    }
    out_put(self, "Content-Length: ", 16);
    char digits[24];
    int nd = 0;
    size_t v = nb;
    do {
        digits[nd++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (nd) self->out[self->out_len++] = digits[--nd];
    out_put(self, "\r\n\r\n", 4);
    if (!head_only) out_put(self, PyBytes_AS_STRING(body), nb);
    rc = (int)st;
done:
    Py_XDECREF(status);
    Py_XDECREF(headers);
    Py_XDECREF(body);
    return rc;
}

static const char *const REQ_SLOTS[8] = {"method", "target", "version", "raw_headers",
                                         "body", "keep_alive", "client", "_headers"};

void aem_request_shape_find(aem_request_shape *shape, PyTypeObject *tp) {
    shape->tp = tp;
    shape->direct = 0;
    if (!PyType_Check(tp) || tp->tp_new != PyBaseObject_Type.tp_new || tp->tp_dictoffset ||
        tp->tp_base != &PyBaseObject_Type)
        return;
    PyObject *slots = PyDict_GetItemString(tp->tp_dict, "__slots__");
    if (!slots || !PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) != 8) return;
    for (int i = 0; i < 8; i++) {
        PyObject *d = PyDict_GetItemString(tp->tp_dict, REQ_SLOTS[i]);
        if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type)) return;
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) return;
        shape->off[i] = m->offset;
    }
    shape->direct = 1;
}

PyObject *aem_request_new(const aem_request_shape *shape, PyObject *const *args, Py_ssize_t nargs) {
    if (!shape->direct) return PyObject_Vectorcall((PyObject *)shape->tp, args, (size_t)nargs, NULL);
    PyObject *obj = shape->tp->tp_alloc(shape->tp, 0);
    if (!obj) return NULL;
    for (int i = 0; i < 8; i++)
        *(PyObject **)((char *)obj + shape->off[i]) = Py_NewRef(i < nargs ? args[i] : Py_None);
    return obj;
}

/* The parsed fields as a list of (name, value) bytes pairs, as they came (a new reference, or NULL). */
PyObject *aem_http_raw_fields(const aem_http_field *fields, int n) {
    PyObject *raw = PyList_New(n);
    if (!raw) return NULL;
    for (int i = 0; i < n; i++) {
        const aem_http_field *f = &fields[i];
        PyObject *pair = PyTuple_New(2);
        PyObject *k = pair ? PyBytes_FromStringAndSize(f->name, (Py_ssize_t)f->name_len) : NULL;
        PyObject *v = k ? PyBytes_FromStringAndSize(f->value, (Py_ssize_t)f->value_len) : NULL;
        if (!v) {
            Py_XDECREF(k);
            Py_XDECREF(pair);
            Py_DECREF(raw);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, k);
        PyTuple_SET_ITEM(pair, 1, v);
        PyList_SET_ITEM(raw, i, pair);
    }
    return raw;
}

static PyObject *make_request(HttpFastObject *self, const aem_http_req *req, PyObject *target, PyObject *addr) {
    PyObject *raw = aem_http_raw_fields(self->fields, req->nfields);
    if (!raw) return NULL;
    PyObject *args[7] = {req->method == AEM_HTTP_GET ? self->s_get : self->s_head, target, self->s_version,
                         raw, self->s_empty, Py_True, addr};
    PyObject *r = aem_request_new(&self->req, args, 7);
    Py_DECREF(raw);
    return r;
}

/* Send out[0..out_len) on fd.  The bytes not sent (a new bytes, or NULL when all went);
 * *err is set to errno when the connection failed. */
static PyObject *flush_out(HttpFastObject *self, int fd, size_t *sent, int *err) {
    size_t off = 0;
    while (off < self->out_len) {
        ssize_t n = send(fd, self->out + off, self->out_len - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) *err = errno;
        break;
    }
    *sent += off;
    PyObject *pending = NULL;
    if (off < self->out_len && !*err)
        pending = PyBytes_FromStringAndSize(self->out + off, (Py_ssize_t)(self->out_len - off));
    self->out_len = 0;
    return pending;
}

static int add_attr(HttpFastObject *self, PyObject *name, size_t n) {
    if (!n) return 0;
    PyObject *obj = self->server;
    if (self->server_dict) {  /* a plain attribute: straight in the instance dict */
        PyObject *v = PyDict_GetItemWithError(self->server_dict, name);
        if (v && PyLong_CheckExact(v)) {
            long long now = PyLong_AsLongLong(v);
            if (now == -1 && PyErr_Occurred()) return -1;
            PyObject *s = PyLong_FromLongLong(now + (long long)n);
            int rc = s ? PyDict_SetItem(self->server_dict, name, s) : -1;
            Py_XDECREF(s);
            return rc;
        }
        if (PyErr_Occurred()) return -1;
    }
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    PyObject *d = PyLong_FromSize_t(n);
    PyObject *s = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    int rc = s ? PyObject_SetAttr(obj, name, s) : -1;
    Py_XDECREF(s);
    return rc;
}

static int count_class(HttpFastObject *self, int st) {
    Py_ssize_t i = st / 100;
    if (!PyList_CheckExact(self->by_class) || i >= PyList_GET_SIZE(self->by_class)) return 0;
    long v = PyLong_AsLong(PyList_GET_ITEM(self->by_class, i));
    if (v == -1 && PyErr_Occurred()) return -1;
    PyObject *n = PyLong_FromLong(v + 1);
    if (!n) return -1;
    return PyList_SetItem(self->by_class, i, n);
}

PyDoc_STRVAR(serve_doc,
"serve(conn, data) -> bytes\n\n"
"Answer the simple requests at the start of data on conn (conn.fd, conn.addr); return\n"
"the bytes left for the full parser (b'' when all were answered).");

/* One pass over data (see serve); *again when the glue asks for another pass on what it returns. */
static PyObject *serve_buf(HttpFastObject *self, PyObject *conn, int fd, PyObject *data, int *again) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    const char *buf = view.buf;
    size_t len = (size_t)view.len, pos = 0, nreq = 0, sent = 0;
    PyObject *addr = NULL, *req = NULL, *result = NULL, *exc = NULL, *pending = NULL, *ret = NULL;
    PyObject *addr_keep = NULL;      /* the access log's client address text */
    const char *addr_text = NULL;
    Py_ssize_t addr_len = 0;
    int err = 0, failed = 0;
    double now = 0;
    const char *prefix = PyBytes_AS_STRING(self->status_prefix);
    size_t nprefix = (size_t)PyBytes_GET_SIZE(self->status_prefix);
    refresh_date(self);
    self->out_len = 0;
    while (pos < len) {
        aem_http_req r;
        if (aem_http_parse(buf + pos, len - pos, &self->lim, &r, self->fields) < 0) break;
        if (r.flags & AEM_HTTP_CLOSE) break;  /* the glue answers it and closes */
        int head_only = r.method == AEM_HTTP_HEAD;
        int st = 0;
        size_t length = 0;
        if (r.target_len >= nprefix && memcmp(r.target, prefix, nprefix) == 0) {
            /* the status page's JSON (http_status.c), or the full path's */
            if (!self->status_mode) break;
            if (!addr && !(addr = PyObject_GetAttr(conn, str_addr))) {
                failed = 1;
                break;
            }
            if (now == 0) now = wall_now();
            st = aem_http_status_json(self, r.target, r.target_len, addr, head_only, nreq + 1, sent, now,
                                      &length);
            if (st < 0) failed = 1;
            if (st <= 0) break;
            pos += r.head_len;
            nreq++;
            goto answered;
        }
        int cacheable = (r.flags & (AEM_HTTP_CANONICAL | AEM_HTTP_CONDITIONAL)) == AEM_HTTP_CANONICAL;
        PyObject *target = PyUnicode_DecodeASCII(r.target, (Py_ssize_t)r.target_len, NULL);
        if (!target) {
            failed = 1;
            break;
        }
        if (cacheable && now == 0) now = wall_now();
        if (self->app == Py_None) {  /* no app: the file cache or the full path */
            st = cacheable ? emit_cached(self, target, head_only, now, &length) : 0;
            Py_DECREF(target);
            if (st < 0) failed = 1;
            if (st <= 0) break;
            pos += r.head_len;
            nreq++;
        } else {
            if (!addr && !(addr = PyObject_GetAttr(conn, str_addr))) {
                Py_DECREF(target);
                failed = 1;
                break;
            }
            req = make_request(self, &r, target, addr);
            if (!req) {
                Py_DECREF(target);
                failed = 1;
                break;
            }
            pos += r.head_len;  /* the app sees it: from here on, it is answered */
            nreq++;
            result = PyObject_CallOneArg(self->app, req);
            if (!result) {
                Py_DECREF(target);
                if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                    failed = 1;  /* KeyboardInterrupt, SystemExit ...: let it through */
                    break;
                }
                exc = aem_fetch_exception();
                break;
            }
            if (result == Py_None)
                st = cacheable ? emit_cached(self, target, head_only, now, &length) : 0;
            else if (Py_TYPE(result) == (PyTypeObject *)self->response_type)
                st = emit_response(self, result, head_only, &length);
            Py_DECREF(target);
            if (st < 0) failed = 1;
            if (st <= 0) break;  /* 0: the glue answers req with result */
            Py_CLEAR(req);
            Py_CLEAR(result);
        }
    answered:
        if (st == 1) st = 200;
        if (count_class(self, st) < 0) {
            failed = 1;
            break;
        }
        if (self->log_flush) {
            if (!addr_text) {
                if (!addr && !(addr = PyObject_GetAttr(conn, str_addr))) {
                    failed = 1;
                    break;
                }
                if (aem_http_log_addr(addr, &addr_keep, &addr_text, &addr_len) < 0) {
                    failed = 1;
                    break;
                }
            }
            if (aem_http_log_request(self, addr_text, (size_t)addr_len, head_only, r.target,
                                     r.target_len, st, length) < 0) {
                failed = 1;
                break;
            }
        }
        self->answered++;
        if (self->out_len > HIGH_WATER) {
            pending = flush_out(self, fd, &sent, &err);
            if (pending || err) break;
        }
    }
    if (self->out_len && !failed) pending = flush_out(self, fd, &sent, &err);
    self->out_len = 0;
    Py_XDECREF(addr_keep);
    Py_XDECREF(addr);
    PyObject *rest = NULL;
    if (!failed && aem_http_log_maybe_flush(self) < 0) failed = 1;
    if (!failed && (add_attr(self, str_requests, nreq) < 0 || add_attr(self, str_bytes_out, sent) < 0))
        failed = 1;
    if (!failed)
        rest = pos == 0 ? Py_NewRef(data) : PyBytes_FromStringAndSize(buf + pos, (Py_ssize_t)(len - pos));
    PyBuffer_Release(&view);
    if (!rest) goto out;
    if (!req && !pending && !err) {
        ret = rest;
        goto out;
    }
    self->slowed = 1;
    PyObject *errno_obj = PyLong_FromLong(err);
    if (errno_obj) {
        PyObject *a[7] = {conn, rest, pending ? pending : Py_None, req ? req : Py_None,
                          result ? result : Py_None, exc ? exc : Py_None, errno_obj};
        ret = PyObject_Vectorcall(self->slow, a, 7, NULL);
        Py_DECREF(errno_obj);
    }
    Py_DECREF(rest);
    if (ret && PyTuple_CheckExact(ret) && PyTuple_GET_SIZE(ret) == 2) {  /* (rest, again) */
        PyObject *t = ret;
        ret = Py_NewRef(PyTuple_GET_ITEM(t, 0));
        *again = PyObject_IsTrue(PyTuple_GET_ITEM(t, 1)) == 1;
        Py_DECREF(t);
    }
out:
    Py_XDECREF(req);
    Py_XDECREF(result);
    Py_XDECREF(exc);
    Py_XDECREF(pending);
    return ret;
}

/* serve(conn, data) on the socket fd; *slowed when the glue ran. */
PyObject *aem_http_serve_fd(HttpFastObject *self, PyObject *conn, int fd, PyObject *data, int *slowed) {
    Py_INCREF(data);
    for (;;) {  /* a pass per request the glue answers, iteratively */
        int again = 0;
        self->slowed = 0;
        PyObject *rest = serve_buf(self, conn, fd, data, &again);
        *slowed |= self->slowed;
        Py_DECREF(data);
        if (!rest || !again) return rest;
        data = rest;
    }
}

static PyObject *fast_serve(HttpFastObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "serve(conn, data) takes 2 arguments");
        return NULL;
    }
    PyObject *conn = args[0];
    PyObject *fdo = PyObject_GetAttr(conn, str_fd);
    int fd = fdo ? (int)PyLong_AsLong(fdo) : -1;
    Py_XDECREF(fdo);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    int slowed = 0;
    return aem_http_serve_fd(self, conn, fd, args[1], &slowed);
}


PyObject *aem_http_fast_type;

static int fast_init(HttpFastObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"server", "app", "request_type", "response_type", "status_lines", "by_class",
                             "server_line", "status_prefix", "slow", "max_request_line", "max_header_size",
                             "max_headers", NULL};
    PyObject *server, *app, *rt, *respt, *lines, *by_class, *sline, *prefix, *slow;
    Py_ssize_t max_line, max_size;
    int max_fields;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO!O!SSOnni:HttpFast", kwlist, &server, &app, &rt, &respt,
                                     &PyDict_Type, &lines, &PyList_Type, &by_class, &sline, &prefix, &slow,
                                     &max_line, &max_size, &max_fields))
        return -1;
    if (max_line < 1 || max_size < 1 || max_fields < 1) {
        PyErr_SetString(PyExc_ValueError, "the limits must be >= 1");
        return -1;
    }
    if (!PyType_Check(respt)) {
        PyErr_SetString(PyExc_TypeError, "response_type must be a type");
        return -1;
    }
    aem_http_field *fields = PyMem_Calloc((size_t)max_fields, sizeof *fields);
    if (!fields) {
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(self->fields);
    self->fields = fields;
    Py_XSETREF(self->server, Py_NewRef(server));
    Py_CLEAR(self->server_dict);
    if (!_PyType_Lookup(Py_TYPE(server), str_requests) && !_PyType_Lookup(Py_TYPE(server), str_bytes_out)) {
        PyObject **dictptr = _PyObject_GetDictPtr(server);
        if (dictptr && *dictptr && PyDict_CheckExact(*dictptr)) self->server_dict = Py_NewRef(*dictptr);
    }
    Py_XSETREF(self->app, Py_NewRef(app));
    Py_XSETREF(self->request_type, Py_NewRef(rt));
    aem_request_shape_find(&self->req, (PyTypeObject *)rt);
    Py_XSETREF(self->response_type, Py_NewRef(respt));
    PyObject *rnames[3] = {str_status, str_headers, str_body};
    for (int i = 0; i < 3; i++) self->resp_off[i] = aem_slot_offset((PyTypeObject *)respt, rnames[i]);
    Py_XSETREF(self->status_lines, Py_NewRef(lines));
    Py_XSETREF(self->by_class, Py_NewRef(by_class));
    Py_XSETREF(self->server_line, Py_NewRef(sline));
    Py_XSETREF(self->status_prefix, Py_NewRef(prefix));
    Py_XSETREF(self->slow, Py_NewRef(slow));
    if (!self->cache && !(self->cache = PyDict_New())) return -1;
    if (!self->s_get) {
        self->s_get = PyUnicode_InternFromString("GET");
        self->s_head = PyUnicode_InternFromString("HEAD");
        self->s_version = PyUnicode_InternFromString("1.1");
        self->s_empty = PyBytes_FromStringAndSize(NULL, 0);
        if (!self->s_get || !self->s_head || !self->s_version || !self->s_empty) return -1;
    }
    self->lim.max_target = (size_t)max_line;
    self->lim.max_field_bytes = (size_t)max_size;
    self->lim.max_fields = max_fields;
    self->date_sec = -1;
    return 0;
}

static int fast_traverse(HttpFastObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->server);
    Py_VISIT(self->app);
    Py_VISIT(self->request_type);
    Py_VISIT(self->response_type);
    Py_VISIT(self->status_lines);
    Py_VISIT(self->slow);
    Py_VISIT(self->cache);
    Py_VISIT(self->by_class);
    Py_VISIT(self->server_dict);
    Py_VISIT(self->log_flush);
    return 0;  /* status_head/mid/tail: bytes, no cycles */
}

static int fast_clear(HttpFastObject *self) {
    Py_CLEAR(self->log_flush);
    Py_CLEAR(self->status_head);
    Py_CLEAR(self->status_mid);
    Py_CLEAR(self->status_tail);
    Py_CLEAR(self->server_dict);
    Py_CLEAR(self->server);
    Py_CLEAR(self->app);
    Py_CLEAR(self->request_type);
    Py_CLEAR(self->response_type);
    Py_CLEAR(self->status_lines);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->by_class);
    Py_CLEAR(self->server_line);
    Py_CLEAR(self->status_prefix);
    Py_CLEAR(self->s_get);
    Py_CLEAR(self->s_head);
    Py_CLEAR(self->s_version);
    Py_CLEAR(self->s_empty);
    return 0;
}

static void fast_dealloc(HttpFastObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    fast_clear(self);
    PyMem_Free(self->fields);
    PyMem_Free(self->out);
    PyMem_Free(self->log);
    PyMem_Free(self->status_body);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *fast_get_cache(HttpFastObject *self, void *closure) {
    if (!self->cache) Py_RETURN_NONE;
    return Py_NewRef(self->cache);
}

static PyMemberDef fast_members[] = {
    {"direct_requests", T_INT, offsetof(HttpFastObject, req.direct), READONLY,
     "True when Requests are filled in directly (the class has Request's __slots__)."},
    {"status_served", T_PYSSIZET, offsetof(HttpFastObject, status_served), READONLY,
     "Status page JSON answers made here (no Python)."},
    {"answered", T_PYSSIZET, offsetof(HttpFastObject, answered), READONLY,
     "Requests answered by the native path from start to end (no Python but the app)."},
    {NULL},
};

static PyObject *fast_set_log(HttpFastObject *self, PyObject *flush) {
    if (flush != Py_None && !PyCallable_Check(flush)) {
        PyErr_SetString(PyExc_TypeError, "set_log(flush): flush must be callable or None");
        return NULL;
    }
    Py_XSETREF(self->log_flush, flush == Py_None ? NULL : Py_NewRef(flush));
    Py_RETURN_NONE;
}

static PyMethodDef fast_methods[] = {
    {"serve", (PyCFunction)(void (*)(void))fast_serve, METH_FASTCALL, serve_doc},
    {"set_log", (PyCFunction)fast_set_log, METH_O,
     "set_log(flush)\n\nKeep an access log (flush: called with no arguments when the buffer passes "
     "64 KiB; the caller then takes it with take_log()), or None: no log."},
    {"log", (PyCFunction)aem_http_log_method, METH_O,
     "log(line)\n\nAppend a line (str, with its newline) to the access log buffer."},
    {"set_status", (PyCFunction)aem_http_set_status_method, METH_VARARGS,
     "set_status(mode, head, mid, tail, taken, max_age)\n\nThe status page's JSON snapshot: head + "
     "server section + mid + time + tail; mode 0 (never here), 1 (everyone), 2 (loopback clients); "
     "taken: time.monotonic() when made; answered from it while at most max_age seconds old."},
    {"take_log", (PyCFunction)aem_http_take_log_method, METH_NOARGS,
     "take_log() -> bytes\n\nThe access log lines buffered so far (UTF-8), and empty the buffer."},
    {NULL},
};

static PyGetSetDef fast_getset[] = {
    {"cache", (getter)fast_get_cache, NULL,
     "The small-file cache the fast path answers from: {target: (expiry, head_rest, body)}, "
     "filled by the glue (aem.http.fast).", NULL},
    {NULL},
};

static PyType_Slot fast_slots[] = {
    {Py_tp_init, fast_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, fast_dealloc},
    {Py_tp_traverse, fast_traverse},
    {Py_tp_clear, fast_clear},
    {Py_tp_methods, fast_methods},
    {Py_tp_getset, fast_getset},
    {Py_tp_members, fast_members},
    {Py_tp_doc, "AEMhttpd's native per-request path (see aem.http.fast, which builds it)."},
    {0, NULL},
};

static PyType_Spec fast_spec = {
    "aem._core.HttpFast", sizeof(HttpFastObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, fast_slots,
};

PyDoc_STRVAR(parse_doc,
"http_parse(data, max_request_line=8192, max_header_size=16384, max_headers=100)\n\n"
"The fast path's verdict on the head at the start of data: (method, target, head_len,\n"
"conditional, canonical, [(name, value), ...], close) for a simple request, or None (the\n"
"full parser decides); close: it asked for Connection: close.  For tests and fuzzing.");

static PyObject *http_parse_py(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data", "max_request_line", "max_header_size", "max_headers", NULL};
    Py_buffer view;
    Py_ssize_t max_line = 8192, max_size = 16384;
    int max_fields = 100;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|nni:http_parse", kwlist, &view, &max_line, &max_size,
                                     &max_fields))
        return NULL;
    PyObject *ret = NULL;
    aem_http_field *fields = NULL;
    if (max_line < 1 || max_size < 1 || max_fields < 1) {
        PyErr_SetString(PyExc_ValueError, "the limits must be >= 1");
        goto done;
    }
    if (!(fields = PyMem_Calloc((size_t)max_fields, sizeof *fields))) {
        PyErr_NoMemory();
        goto done;
    }
    aem_http_limits lim = {(size_t)max_line, (size_t)max_size, max_fields};
    aem_http_req r;
    if (aem_http_parse(view.buf, (size_t)view.len, &lim, &r, fields) < 0) {
        ret = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *raw = PyList_New(r.nfields);
    for (int i = 0; raw && i < r.nfields; i++) {
        PyObject *pair = Py_BuildValue("(y#y#)", fields[i].name, (Py_ssize_t)fields[i].name_len, fields[i].value,
                                       (Py_ssize_t)fields[i].value_len);
        if (!pair) Py_CLEAR(raw);
        else PyList_SET_ITEM(raw, i, pair);
    }
    if (raw)
        ret = Py_BuildValue("(sy#nOONO)", r.method == AEM_HTTP_GET ? "GET" : "HEAD", r.target,
                            (Py_ssize_t)r.target_len, (Py_ssize_t)r.head_len,
                            (r.flags & AEM_HTTP_CONDITIONAL) ? Py_True : Py_False,
                            (r.flags & AEM_HTTP_CANONICAL) ? Py_True : Py_False, raw,
                            (r.flags & AEM_HTTP_CLOSE) ? Py_True : Py_False);
done:
    PyMem_Free(fields);
    PyBuffer_Release(&view);
    return ret;
}

static PyMethodDef http_functions[] = {
    {"http_parse", (PyCFunction)(void (*)(void))http_parse_py, METH_VARARGS | METH_KEYWORDS, parse_doc},
    {NULL},
};

int aem_http_fast_init(PyObject *module) {
#define INTERN(var, s) if (!(var = PyUnicode_InternFromString(s))) return -1
    INTERN(str_fd, "fd");
    INTERN(str_addr, "addr");
    INTERN(str_status, "status");
    INTERN(str_headers, "headers");
    INTERN(str_body, "body");
    INTERN(str_requests, "requests");
    INTERN(str_bytes_out, "bytes_out");
#undef INTERN
    PyObject *tp = PyType_FromSpec(&fast_spec);
    if (!tp || PyModule_AddObjectRef(module, "HttpFast", tp) < 0) {
        Py_XDECREF(tp);
        return -1;
    }
    aem_http_fast_type = tp;
    if (aem_http_hook_init(module) < 0 || aem_http_status_init() < 0) return -1;
    return PyModule_AddFunctions(module, http_functions);
}
