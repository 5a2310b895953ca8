/* http_log.c — the access log of AEMhttpd's fast path.
 *
 * While the server keeps an access log, every answer — the C path's and, through
 * HttpFast.log(), the full path's — goes into one buffer here as a Common Log Format
 * line, in the order the answers were made:
 *
 *   127.0.0.1 - - [01/Dec/2026:01:02:03 +0000] "GET /a.txt HTTP/1.1" 200 10
 *
 * (as HTTPServer._log_line writes it).  No Python runs per request: the glue takes the
 * buffer (HttpFast.take_log()) and writes it to the log stream on the server's periodic
 * tick and at shutdown, and the C path calls the glue's flush when the buffer passes
 * LOG_HIGH bytes. */
#include "pyaem.h"
#include "http_fast.h"

#include <string.h>

#define LOG_HIGH (64 * 1024)

static int log_reserve(HttpFastObject *self, size_t n) {
    return aem_http_reserve(&self->log, &self->log_cap, self->log_len, n);
}

static void log_put(HttpFastObject *self, const void *data, size_t n) {
    memcpy(self->log + self->log_len, data, n);
    self->log_len += n;
}

/* "[01/Dec/2026:01:02:03 +0000]" for sec, as time.strftime("[%d/%b/%Y:%H:%M:%S +0000]") in
 * the C locale. */
static void log_stamp(HttpFastObject *self, time_t sec) {
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm tm;
    gmtime_r(&sec, &tm);
    int n = snprintf(self->log_time, sizeof self->log_time, "[%02d/%s/%04d:%02d:%02d:%02d +0000]",
                     tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                     tm.tm_sec);
    self->log_time_len = n > 0 ? (size_t)n : 0;
    self->log_sec = sec;
}

int aem_http_log_addr(PyObject *addr, PyObject **keep, const char **text, Py_ssize_t *n) {
    *keep = NULL;
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) == 0) {  /* a Unix socket: "-" */
        *text = "-";
        *n = 1;
        return 0;
    }
    PyObject *s = PyObject_Str(PyTuple_GET_ITEM(addr, 0));
    if (!s) return -1;
    *text = PyUnicode_AsUTF8AndSize(s, n);
    if (!*text) {
        Py_DECREF(s);
        return -1;
    }
    *keep = s;
    return 0;
}

int aem_http_log_request(HttpFastObject *self, const char *addr, size_t naddr, int head_only,
                         const char *target, size_t ntarget, int status, size_t length) {
    if (self->log_sec != self->date_sec) log_stamp(self, self->date_sec);
    /* addr " - - " time ' "' method ' ' target ' HTTP/1.1" ' status ' ' length '\n' */
    if (log_reserve(self, naddr + self->log_time_len + ntarget + 64) < 0) return -1;
    log_put(self, addr, naddr);
    log_put(self, " - - ", 5);
    log_put(self, self->log_time, self->log_time_len);
    if (head_only) log_put(self, " \"HEAD ", 7);
    else log_put(self, " \"GET ", 6);
    log_put(self, target, ntarget);
    self->log_len += (size_t)snprintf(self->log + self->log_len, 48, " HTTP/1.1\" %d %zu\n", status, length);
    return 0;
}

int aem_http_log_maybe_flush(HttpFastObject *self) {
    if (self->log_len < LOG_HIGH || !self->log_flush) return 0;
    PyObject *r = PyObject_CallNoArgs(self->log_flush);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

PyObject *aem_http_log_method(HttpFastObject *self, PyObject *line) {
    if (!PyUnicode_Check(line)) {
        PyErr_Format(PyExc_TypeError, "log() takes a str, not %.100s", Py_TYPE(line)->tp_name);
        return NULL;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(line, &n);
    if (!s || log_reserve(self, (size_t)n) < 0) return NULL;
    log_put(self, s, (size_t)n);
    Py_RETURN_NONE;
}

PyObject *aem_http_take_log_method(HttpFastObject *self, PyObject *unused) {
    PyObject *r = PyBytes_FromStringAndSize(self->log, (Py_ssize_t)self->log_len);
    if (r) self->log_len = 0;
    return r;
}
