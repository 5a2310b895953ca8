/* module.c — aem._core: the extension module's init, exceptions and constants.
 *
 * The C core is split by concern:
 *   engine.c, timers.c, signals.c, doorbell.c  the engine in plain C
 *   event.c      aem.Event and its subclasses
 *   pyengine.c   aem._core.Engine: registration, control, run, introspection (pyengine.h)
 *   delivery.c   one occurrence to its handler (per-kind work, errors, back-off)
 *   async_delivery.c  aem.start(): the doorbell's drain in the main thread
 *   handoff.c    the native capsule hand-off record
 *   loop*.c      aem.EventLoop's hot core (ready queue, timers, fd wakers, streams)
 *   vmtable*.c   the buddy allocator and its Python face
 *   http_*.c     AEMhttpd's native per-request path: a strict head parser, a responder,
 *                the engine's read hook
 */
#include "pyaem.h"

#include <sys/epoll.h>
#include <sys/inotify.h>

PyObject *AemError;
PyObject *AemUnknownEvent;
PyObject *aem_socket_type;
PyObject *aem_timer_type;
PyObject *aem_str_attach, *aem_str_sockargs, *aem_str_path;

PyObject *aem_kick(PyObject *module, PyObject *args);
PyObject *aem_deny_process_creation(PyObject *module, PyObject *arg);
PyObject *aem_set_child_subreaper(PyObject *module, PyObject *arg);
PyObject *aem_set_parent_death_signal(PyObject *module, PyObject *arg);
int aem_vmtable_module_init(PyObject *module);
int aem_vmtable_bench_init(PyObject *module);  /* vmtable_bench.c */
int aem_http_fast_init(PyObject *module);
int aem_handoff_init(PyObject *module);
int aem_asgi_init(PyObject *module);     /* asgi_cycle.c */
int aem_asgi_scope_init(PyObject *module);  /* asgi_scope.c */

static PyObject *set_types(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"timer", NULL};
    PyObject *timer;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:_set_types", kwlist, &PyType_Type, &timer)) return NULL;
    Py_XSETREF(aem_timer_type, Py_NewRef(timer));
    Py_RETURN_NONE;
}

static PyObject *signal_routed(PyObject *module, PyObject *arg) {
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(aem_signal_routed_fd((int)sig) >= 0);
}

static PyObject *monotonic_ns(PyObject *module, PyObject *noargs) { return PyLong_FromLongLong(aem_now_ns()); }

static PyMethodDef module_methods[] = {
    {"_kick", (PyCFunction)aem_kick, METH_VARARGS, "Handler of the kick signal: deliver what is ready."},
    {"_set_types", (PyCFunction)(void (*)(void))set_types, METH_VARARGS | METH_KEYWORDS, NULL},
    {"_deny_process_creation", aem_deny_process_creation, METH_O,
     "Fault injection for tests: the kernel refuses to create processes from now on (seccomp)."},
    {"set_child_subreaper", aem_set_child_subreaper, METH_O,
     "prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to this process."},
    {"set_parent_death_signal", aem_set_parent_death_signal, METH_O,
     "prctl(PR_SET_PDEATHSIG): this signal arrives when the parent (thread) dies."},
    {"signal_routed", signal_routed, METH_O, "True while an aem engine routes this signal."},
    {"monotonic_ns", monotonic_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns, the clock of Event.time_ns."},
    {NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "aem._core", "The C core of aem.", -1, module_methods,
};

#define ADD_INT(name, value) \
    if (PyModule_AddIntConstant(m, name, (long)(value)) < 0) goto fail

PyMODINIT_FUNC PyInit__core(void) {
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    AemError = PyErr_NewExceptionWithDoc("aem.AemError", "Misuse of the aem engine.", PyExc_RuntimeError, NULL);
    if (!AemError || PyModule_AddObjectRef(m, "AemError", AemError) < 0) goto fail;
    AemUnknownEvent = PyErr_NewExceptionWithDoc(
        "aem.UnknownEventError", "No registered event has this id (never registered, or unregistered).",
        PyExc_LookupError, NULL);
    if (!AemUnknownEvent || PyModule_AddObjectRef(m, "UnknownEventError", AemUnknownEvent) < 0) goto fail;

    PyObject *socket_mod = PyImport_ImportModule("socket");
    if (!socket_mod) goto fail;
    aem_socket_type = PyObject_GetAttrString(socket_mod, "socket");
    Py_DECREF(socket_mod);
    if (!aem_socket_type) goto fail;

#define INTERN(var, s) if (!(var = PyUnicode_InternFromString(s))) goto fail
    INTERN(aem_str_attach, "_attach");
    INTERN(aem_str_sockargs, "_sockargs");
    INTERN(aem_str_path, "path");

    if (aem_event_init_types(m) < 0) goto fail;
    if (aem_engine_init_type(m) < 0) goto fail;
    if (aem_sources_init_types(m) < 0) goto fail;
    if (aem_loop_init_type(m) < 0) goto fail;
    if (aem_vmtable_module_init(m) < 0) goto fail;
    if (aem_vmtable_bench_init(m) < 0) goto fail;
    if (aem_http_fast_init(m) < 0) goto fail;
    if (aem_handoff_init(m) < 0) goto fail;
    if (aem_asgi_init(m) < 0 || aem_asgi_scope_init(m) < 0) goto fail;

    ADD_INT("K_TIMER", AEM_K_TIMER);
    ADD_INT("K_READABLE", AEM_K_READABLE);
    ADD_INT("K_WRITABLE", AEM_K_WRITABLE);
    ADD_INT("K_ACCEPT", AEM_K_ACCEPT);
    ADD_INT("K_READ", AEM_K_READ);
    ADD_INT("K_CLOSE", AEM_K_CLOSE);
    ADD_INT("K_SIGNAL", AEM_K_SIGNAL);
    ADD_INT("K_CHILD", AEM_K_CHILD);
    ADD_INT("K_JOB", AEM_K_JOB);
    ADD_INT("K_FILE", AEM_K_FILE);
    ADD_INT("K_USER", AEM_K_USER);
    ADD_INT("K_PRESSURE", AEM_K_PRESSURE);
    ADD_INT("K_CUSTOM", AEM_K_CUSTOM);
    ADD_INT("K_HOSTED", AEM_K_HOSTED);
    ADD_INT("EVF_ONESHOT", AEM_F_ONESHOT);
    ADD_INT("EVF_FORK", AEM_F_FORK);
    ADD_INT("EVF_NOCLDWAIT", AEM_F_NOCLDWAIT);
    ADD_INT("EVF_CAPSULE", AEM_F_CAPSULE);
    ADD_INT("EVF_KEEPALIVE", AEM_F_KEEPALIVE);
    ADD_INT("EVJOBPRIO", AEM_EVJOBPRIO);
    ADD_INT("EVTBLINIT", AEM_EVTBLINIT);
    ADD_INT("EVJOBSHTDN", AEM_EVJOBSHTDN);
    ADD_INT("EVJOBSTART", AEM_EVJOBSTART);
    ADD_INT("EVJOBSTOP", AEM_EVJOBSTOP);
    ADD_INT("HELD_MAX", AEM_HELD_MAX);
    ADD_INT("EPOLLIN", EPOLLIN);
    ADD_INT("EPOLLOUT", EPOLLOUT);
    ADD_INT("EPOLLPRI", EPOLLPRI);
    ADD_INT("EPOLLRDHUP", EPOLLRDHUP);
    ADD_INT("EPOLLHUP", EPOLLHUP);
    ADD_INT("EPOLLERR", EPOLLERR);
    ADD_INT("SIZEOF_REGISTRATION", sizeof(aem_reg));
    ADD_INT("SIZEOF_TIMER_ENTRY", sizeof(aem_tentry));
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
