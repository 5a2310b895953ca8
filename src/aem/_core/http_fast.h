/* http_fast.h — what the fast path's responder (http_fast.c) shares with the engine's
 * read hook (http_hook.c). */
#ifndef AEM_HTTP_FAST_H
#define AEM_HTTP_FAST_H

#include "pyaem.h"
#include "http_parse.h"

#include <time.h>

/* A Request class as the C side builds it: when the class has exactly the slots of
 * aem.http.protocol.Request (and nothing else of its own), its objects are filled in
 * directly, without running __init__ (a Python frame per request); any other shape is
 * called.  tp is borrowed: whoever holds the shape keeps the class alive. */
typedef struct {
    PyTypeObject *tp;
    Py_ssize_t off[8];            /* method, target, version, raw_headers, body, keep_alive,
                                     client, _headers */
    int direct;
} aem_request_shape;

void aem_request_shape_find(aem_request_shape *shape, PyTypeObject *tp);
/* Request(*args) (nargs 6 or 7: without or with the client; the rest None), a new reference. */
PyObject *aem_request_new(const aem_request_shape *shape, PyObject *const *args, Py_ssize_t nargs);

typedef struct {
    PyObject_HEAD
    PyObject *server, *app, *request_type, *response_type, *status_lines, *slow, *cache, *by_class;
    PyObject *server_dict;        /* the server's __dict__, where its counters live (or NULL) */
    PyObject *server_line;        /* bytes */
    PyObject *status_prefix;      /* bytes: targets starting with it go to the full path */
    PyObject *s_get, *s_head, *s_version, *s_empty;
    aem_http_limits lim;
    aem_http_field *fields;
    char *out;
    size_t out_len, out_cap;
    aem_request_shape req;        /* how request_type's objects are made */
    Py_ssize_t resp_off[3];       /* Response's status, headers, body slots (-1: by name) */
    Py_ssize_t answered;          /* requests answered here from start to end */
    int slowed;                   /* the last pass called the glue */
    time_t date_sec;
    char date[64];
    size_t date_len;
    /* the access log (http_log.c): NULL log_flush, no log */
    PyObject *log_flush;          /* the glue's flush, called when the buffer passes LOG_HIGH */
    char *log;
    size_t log_len, log_cap;
    time_t log_sec;
    char log_time[48];
    size_t log_time_len;
    /* the status page's JSON (http_status.c) */
    int status_mode;              /* 0: never here, 1: for everyone, 2: for loopback clients */
    PyObject *status_head, *status_mid, *status_tail;   /* the snapshot's JSON text (bytes) */
    double status_taken, status_max_age;                /* CLOCK_MONOTONIC seconds */
    char *status_body;
    size_t status_len, status_cap;
    Py_ssize_t status_served;
} HttpFastObject;

extern PyObject *aem_http_fast_type;

/* HttpFast.serve(conn, data) on socket fd: the bytes left for the full parser (new
 * reference) or NULL; *slowed is set when the glue (aem.http.fast) ran. */
PyObject *aem_http_serve_fd(HttpFastObject *self, PyObject *conn, int fd, PyObject *data, int *slowed);

/* Room for n more bytes in the growing buffer *buf (len used of *cap); -1 (MemoryError). */
int aem_http_reserve(char **buf, size_t *cap, size_t len, size_t n);

/* The offset of a plain __slots__ attribute of tp (read and written in place), or -1. */
Py_ssize_t aem_slot_offset(PyTypeObject *tp, PyObject *name);

int aem_http_hook_init(PyObject *module);

/* The access log (http_log.c).  The client's address as the log shows it (addr[0], or "-");
 * *keep holds the text's owner (release it). */
int aem_http_log_addr(PyObject *addr, PyObject **keep, const char **text, Py_ssize_t *n);
/* One line for a GET (or HEAD) of target answered with status and length body bytes. */
int aem_http_log_request(HttpFastObject *self, const char *addr, size_t naddr, int head_only,
                         const char *target, size_t ntarget, int status, size_t length);
/* Call the glue's flush when the buffer is past its high-water mark. */
int aem_http_log_maybe_flush(HttpFastObject *self);
PyObject *aem_http_log_method(HttpFastObject *self, PyObject *line);
PyObject *aem_http_take_log_method(HttpFastObject *self, PyObject *unused);

/* /_aem/status?format=json (http_status.c): 200 when answered into self->out (the body's
 * length in *length), 0 when the full path answers it, -1 on error.  nreq: the requests
 * of this batch so far, this one included; sent: the bytes this batch has sent. */
int aem_http_status_json(HttpFastObject *self, const char *target, size_t ntarget, PyObject *addr,
                         int head_only, size_t nreq, size_t sent, double now, size_t *length);
PyObject *aem_http_set_status_method(HttpFastObject *self, PyObject *args);
int aem_http_status_init(void);

/* The parsed fields as a list of (name, value) bytes pairs (http_fast.c; a new reference or NULL). */
PyObject *aem_http_raw_fields(const aem_http_field *fields, int n);

#endif
