/* asgi_scope.c — the ASGI server's request side in C: a simple request head straight to an
 * aem.http.protocol.Request (simple_request), and a Request to its ASGI http scope (asgi_scope).
 *
 * simple_request is RequestParser.feed_simple's C half: http_parse.c (fuzzed, differential-
 * tested against the full parser), with the Request built here rather than from a tuple.
 * asgi_scope builds what aem.http.asgi.make_scope builds for an http request, header names
 * lower-cased (a name seen before is looked up, not lowered again; a pair already in lower
 * case is used as it is).  A target that is not a plain origin-form path, or a path with a
 * percent sign, is left to the Python function (None).
 */
#include "pyaem.h"
#include "http_fast.h"
#include "http_parse.h"

#include <structmember.h>

#include <string.h>

static PyObject *s_get, *s_head, *s_v11, *s_empty_bytes;
static PyObject *k_type, *k_asgi, *k_http_version, *k_scheme, *k_path, *k_raw_path, *k_query_string,
    *k_root_path, *k_headers, *k_server, *k_client, *k_state, *k_method, *k_extensions, *k_zerocopy, *v_http,
    *n_target, *n_method, *n_version, *n_raw_headers;
static PyObject *asgi_info;     /* the scope's "asgi" dict, shared by every scope */
static PyObject *lowered;       /* header name (bytes) -> the same in lower case */

/* ---- simple_request ---------------------------------------------------------------------------------- */

static aem_http_field *fields;
static int nfields_cap;

static aem_request_shape req_shape;   /* of the last request_type seen (held: req_type) */
static PyObject *req_type;

PyDoc_STRVAR(request_doc,
"simple_request(data, max_request_line, max_header_size, max_headers, request_type)\n\n"
"The Request data is when it is exactly one simple head (see http_parse.h), else None.");

static PyObject *simple_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs == 5 && !PyBytes_CheckExact(args[0])) Py_RETURN_NONE;   /* (bytearray ...: the full parser) */
    if (nargs != 5 || !PyType_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "simple_request(data: bytes, max_request_line, max_header_size, max_headers, request_type)");
        return NULL;
    }
    Py_ssize_t max_line = PyLong_AsSsize_t(args[1]), max_size = PyLong_AsSsize_t(args[2]);
    long max_fields = PyLong_AsLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (max_line < 1 || max_size < 1 || max_fields < 1 || max_fields > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "the limits must be >= 1");
        return NULL;
    }
    if (max_fields > nfields_cap) {
        aem_http_field *f = PyMem_Realloc(fields, sizeof *fields * (size_t)max_fields);
        if (!f) return PyErr_NoMemory();
        fields = f;
        nfields_cap = (int)max_fields;
    }
    const char *buf = PyBytes_AS_STRING(args[0]);
    size_t len = (size_t)PyBytes_GET_SIZE(args[0]);
    aem_http_limits lim = {(size_t)max_line, (size_t)max_size, (int)max_fields};
    aem_http_req r;
    if (aem_http_parse(buf, len, &lim, &r, fields) < 0 || r.head_len != len) Py_RETURN_NONE;
    PyObject *raw = aem_http_raw_fields(fields, r.nfields);
    if (!raw) return NULL;
    PyObject *target = PyUnicode_DecodeLatin1(r.target, (Py_ssize_t)r.target_len, NULL);
    if (!target) {
        Py_DECREF(raw);
        return NULL;
    }
    PyObject *argv[6] = {r.method == AEM_HTTP_GET ? s_get : s_head, target, s_v11, raw, s_empty_bytes,
                         (r.flags & AEM_HTTP_CLOSE) ? Py_False : Py_True};
    if (args[4] != req_type) {
        Py_XSETREF(req_type, Py_NewRef(args[4]));
        aem_request_shape_find(&req_shape, (PyTypeObject *)args[4]);
    }
    PyObject *req = aem_request_new(&req_shape, argv, 6);
    Py_DECREF(target);
    Py_DECREF(raw);
    return req;
}

/* ---- asgi_scope ------------------------------------------------------------------------------------ */

/* The header pairs with their names in lower case (new reference). */
static PyObject *lower_headers(PyObject *raw) {
    if (!PyList_CheckExact(raw)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(raw);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(raw, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 0)))
            goto odd;
        PyObject *name = PyTuple_GET_ITEM(pair, 0);
        const char *s = PyBytes_AS_STRING(name);
        Py_ssize_t len = PyBytes_GET_SIZE(name), j = 0;
        while (j < len && !(s[j] >= 'A' && s[j] <= 'Z')) j++;
        if (j == len) {
            PyList_SET_ITEM(out, i, Py_NewRef(pair));
            continue;
        }
        PyObject *low = PyDict_GetItemWithError(lowered, name);
        if (low) {
            Py_INCREF(low);
        } else {
            if (PyErr_Occurred()) goto fail;
            /* a new object to lower in place (from NULL: a one-byte bytes made from a string is
             * the interpreter's shared singleton) */
            low = PyBytes_FromStringAndSize(NULL, len);
            if (!low) goto fail;
            char *d = PyBytes_AS_STRING(low);
            for (Py_ssize_t m = 0; m < len; m++) d[m] = (char)(s[m] >= 'A' && s[m] <= 'Z' ? s[m] + 32 : s[m]);
            if (PyDict_GET_SIZE(lowered) >= 512) PyDict_Clear(lowered);
            if (PyDict_SetItem(lowered, name, low) < 0) {
                Py_DECREF(low);
                goto fail;
            }
        }
        PyObject *p = PyTuple_New(2);
        if (!p) {
            Py_DECREF(low);
            goto fail;
        }
        PyTuple_SET_ITEM(p, 0, low);
        PyTuple_SET_ITEM(p, 1, Py_NewRef(PyTuple_GET_ITEM(pair, 1)));
        PyList_SET_ITEM(out, i, p);
    }
    return out;
odd:
    Py_DECREF(out);
    return Py_NewRef(Py_None);
fail:
    Py_DECREF(out);
    return NULL;
}

static int put(PyObject *d, PyObject *k, PyObject *v) {
    if (!v) return -1;
    int r = PyDict_SetItem(d, k, v);
    Py_DECREF(v);
    return r;
}

PyDoc_STRVAR(scope_doc,
"asgi_scope(req, root_path, server, client, state)\n\n"
"The ASGI http scope of req (a Request), or None when aem.http.asgi.make_scope decides.");

static PyObject *asgi_scope(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5 || !PyUnicode_CheckExact(args[1]) || !PyDict_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "asgi_scope(req, root_path: str, server, client, state: dict)");
        return NULL;
    }
    PyObject *req = args[0], *root = args[1];
    PyObject *target = NULL, *method = NULL, *version = NULL, *raw = NULL, *headers = NULL, *scope = NULL;
    if (!(target = PyObject_GetAttr(req, n_target))) goto done;
    if (!PyUnicode_CheckExact(target) || PyUnicode_KIND(target) != PyUnicode_1BYTE_KIND) {
        scope = Py_NewRef(Py_None);
        goto done;
    }
    const char *t = (const char *)PyUnicode_1BYTE_DATA(target);
    Py_ssize_t tn = PyUnicode_GET_LENGTH(target);
    const char *q = memchr(t, '?', (size_t)tn);
    Py_ssize_t pn = q ? q - t : tn;
    if (!pn || t[0] != '/' || memchr(t, '%', (size_t)pn)) {
        scope = Py_NewRef(Py_None);   /* not origin-form, or percent-encoded: the Python way */
        goto done;
    }
    if (!(method = PyObject_GetAttr(req, n_method)) || !(version = PyObject_GetAttr(req, n_version)) ||
        !(raw = PyObject_GetAttr(req, n_raw_headers)))
        goto done;
    if (!(headers = lower_headers(raw))) goto done;
    if (headers == Py_None) {
        scope = Py_NewRef(Py_None);
        goto done;
    }
    if (!(scope = _PyDict_NewPresized(14))) goto done;
    PyObject *p = PyUnicode_Substring(target, 0, pn);
    if (p && PyUnicode_GET_LENGTH(root)) Py_SETREF(p, PyUnicode_Concat(root, p));
    PyObject *ext = PyDict_New();
    if (!ext || put(ext, k_zerocopy, PyDict_New()) < 0) {
        Py_XDECREF(ext);
        Py_XDECREF(p);
        Py_CLEAR(scope);
        goto done;
    }
    if (PyDict_SetItem(scope, k_type, v_http) < 0 || PyDict_SetItem(scope, k_asgi, asgi_info) < 0 ||
        PyDict_SetItem(scope, k_http_version, version) < 0 || PyDict_SetItem(scope, k_scheme, v_http) < 0 ||
        put(scope, k_path, p) < 0 || put(scope, k_raw_path, PyBytes_FromStringAndSize(t, pn)) < 0 ||
        put(scope, k_query_string, q ? PyBytes_FromStringAndSize(q + 1, tn - pn - 1) : Py_NewRef(s_empty_bytes)) < 0 ||
        PyDict_SetItem(scope, k_root_path, root) < 0 || PyDict_SetItem(scope, k_headers, headers) < 0 ||
        PyDict_SetItem(scope, k_server, args[2]) < 0 || PyDict_SetItem(scope, k_client, args[3]) < 0 ||
        put(scope, k_state, PyDict_Copy(args[4])) < 0 || PyDict_SetItem(scope, k_method, method) < 0 ||
        put(scope, k_extensions, ext) < 0)
        Py_CLEAR(scope);
done:
    Py_XDECREF(target);
    Py_XDECREF(method);
    Py_XDECREF(version);
    Py_XDECREF(raw);
    Py_XDECREF(headers);
    return scope;
}

/* asgi_scope_configure(asgi): the scope's shared "asgi" dict. */
static PyObject *asgi_scope_configure(PyObject *module, PyObject *info) {
    (void)module;
    if (!PyDict_Check(info)) {
        PyErr_SetString(PyExc_TypeError, "asgi_scope_configure(asgi: dict)");
        return NULL;
    }
    Py_XSETREF(asgi_info, Py_NewRef(info));
    Py_RETURN_NONE;
}

static PyMethodDef scope_functions[] = {
    {"simple_request", (PyCFunction)(void (*)(void))simple_request, METH_FASTCALL, request_doc},
    {"asgi_scope", (PyCFunction)(void (*)(void))asgi_scope, METH_FASTCALL, scope_doc},
    {"asgi_scope_configure", asgi_scope_configure, METH_O, "asgi_scope_configure(asgi): set by aem.http.asgi."},
    {NULL},
};

int aem_asgi_scope_init(PyObject *module) {
    struct {
        PyObject **var;
        const char *s;
    } names[] = {
        {&s_get, "GET"}, {&s_head, "HEAD"}, {&s_v11, "1.1"},
        {&k_type, "type"}, {&k_asgi, "asgi"}, {&k_http_version, "http_version"}, {&k_scheme, "scheme"},
        {&k_path, "path"}, {&k_raw_path, "raw_path"}, {&k_query_string, "query_string"},
        {&k_root_path, "root_path"}, {&k_headers, "headers"}, {&k_server, "server"}, {&k_client, "client"},
        {&k_state, "state"}, {&k_method, "method"}, {&k_extensions, "extensions"},
        {&k_zerocopy, "http.response.zerocopysend"}, {&v_http, "http"}, {&n_target, "target"},
        {&n_method, "method"}, {&n_version, "version"}, {&n_raw_headers, "raw_headers"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].var = PyUnicode_InternFromString(names[i].s))) return -1;
    if (!(s_empty_bytes = PyBytes_FromStringAndSize(NULL, 0)) || !(lowered = PyDict_New()) ||
        !(asgi_info = PyDict_New()))
        return -1;
    return PyModule_AddFunctions(module, scope_functions);
}
