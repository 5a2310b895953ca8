/* http_fast.h — what the fast path's responder (http_fast.c) shares with the engine's
 * read hook (http_hook.c). */
#ifndef AEM_HTTP_FAST_H
#define AEM_HTTP_FAST_H

#include "pyaem.h"
#include "http_parse.h"

#include <time.h>

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
    Py_ssize_t req_off[8];        /* the Request's slots (REQ_SLOTS), when filled directly */
    Py_ssize_t resp_off[3];       /* Response's status, headers, body slots (-1: by name) */
    int req_direct;
    Py_ssize_t answered;          /* requests answered here from start to end */
    int slowed;                   /* the last pass called the glue */
    time_t date_sec;
    char date[64];
    size_t date_len;
} HttpFastObject;

extern PyObject *aem_http_fast_type;

/* HttpFast.serve(conn, data) on socket fd: the bytes left for the full parser (new
 * reference) or NULL; *slowed is set when the glue (aem.http.fast) ran. */
PyObject *aem_http_serve_fd(HttpFastObject *self, PyObject *conn, int fd, PyObject *data, int *slowed);

/* The offset of a plain __slots__ attribute of tp (read and written in place), or -1. */
Py_ssize_t aem_slot_offset(PyTypeObject *tp, PyObject *name);

int aem_http_hook_init(PyObject *module);

#endif
