/* event.c — aem.Event and its per-kind subclasses.
 *
 * One C layout for every kind (EventObject in pyaem.h): two raw integers
 * (a, b) and four object slots whose meaning depends on the kind; each
 * subclass names them with getters (TimerEvent.count is `a`, ReadEvent.data
 * is o[0], ...).  Values are turned into Python objects only when read.
 * Events have a __dict__ so constructors may add data of their own.
 */
#include "pyaem.h"

#include <stddef.h>
#include <structmember.h>
#include <sys/epoll.h>

PyTypeObject *aem_event_types[AEM_K__COUNT];
PyTypeObject *AemEvent_Type;

/* Field ids used as getter closures. */
enum {
    F_A_INT = 1, F_A_BOOL, F_A_LOW32, F_B_INT, F_O0, F_O1, F_O2, F_O3, F_SIGINFO, F_PATH,
};

EventObject *aem_event_new(uint8_t kind, uint64_t eid, int64_t time_ns, PyObject *source) {
    PyTypeObject *tp = aem_event_types[kind] ? aem_event_types[kind] : AemEvent_Type;
    EventObject *ev = PyObject_GC_New(EventObject, tp);
    if (!ev) return NULL;
    ev->eid = eid;
    ev->time_ns = time_ns;
    ev->a = ev->b = 0;
    ev->source = source;
    Py_XINCREF(source);
    ev->o[0] = ev->o[1] = ev->o[2] = ev->o[3] = NULL;
    ev->dict = NULL;
    ev->t_after = ev->t_interval = 0;
    ev->kind = kind;
    ev->kept = 0;
    PyObject_GC_Track(ev);
    return ev;
}

static int event_traverse(EventObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->source);
    for (int i = 0; i < 4; i++) Py_VISIT(self->o[i]);
    Py_VISIT(self->dict);
    return 0;
}

static int event_clear(EventObject *self) {
    Py_CLEAR(self->source);
    for (int i = 0; i < 4; i++) Py_CLEAR(self->o[i]);
    Py_CLEAR(self->dict);
    return 0;
}

static void event_dealloc(EventObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    event_clear(self);
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

static PyObject *field_get(EventObject *self, void *closure) {
    switch ((int)(intptr_t)closure) {
    case F_A_INT:
        return PyLong_FromUnsignedLongLong(self->a);
    case F_A_BOOL:
        return PyBool_FromLong(self->a != 0);
    case F_A_LOW32:
        return PyLong_FromLong((long)(self->a & 0xffffffffu));
    case F_B_INT:
        return PyLong_FromLongLong((long long)self->b);
    case F_O0: case F_O1: case F_O2: case F_O3: {
        PyObject *v = self->o[(int)(intptr_t)closure - F_O0];
        if (!v) v = Py_None;
        return Py_NewRef(v);
    }
    case F_SIGINFO: {
        int32_t pid = (int32_t)(self->b >> 32);
        uint32_t uid = (uint32_t)self->b;
        int32_t code = (int32_t)(self->a >> 32);
        PyObject *p = pid >= 0 ? PyLong_FromLong(pid) : Py_NewRef(Py_None);
        PyObject *u = uid != (uint32_t)-1 ? PyLong_FromUnsignedLong(uid) : Py_NewRef(Py_None);
        PyObject *d = (p && u) ? Py_BuildValue("{sOsOsi}", "pid", p, "uid", u, "code", code) : NULL;
        Py_XDECREF(p);
        Py_XDECREF(u);
        return d;
    }
    case F_PATH: {
        if (!self->source) Py_RETURN_NONE;
        return PyObject_GetAttr(self->source, aem_str_path);
    }
    }
    PyErr_SetString(PyExc_AttributeError, "unknown event field");
    return NULL;
}

static PyObject *event_get_eid(EventObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->eid); }
static PyObject *event_get_time(EventObject *self, void *c) { return PyLong_FromLongLong(self->time_ns); }
static PyObject *event_get_kept(EventObject *self, void *c) { return PyBool_FromLong(self->kept); }

static PyObject *event_get_source(EventObject *self, void *c) {
    if (!self->source && self->kind == AEM_K_TIMER && aem_timer_type) {
        PyObject *after = PyFloat_FromDouble((double)self->t_after / 1e9);
        PyObject *interval = self->t_interval > 0 ? PyFloat_FromDouble((double)self->t_interval / 1e9)
                                                  : Py_NewRef(Py_None);
        if (after && interval) self->source = PyObject_CallFunctionObjArgs(aem_timer_type, after, interval, NULL);
        Py_XDECREF(after);
        Py_XDECREF(interval);
        if (!self->source) return NULL;
    }
    return Py_NewRef(self->source ? self->source : Py_None);
}

static PyObject *event_keep(EventObject *self, PyObject *noargs) {
    self->kept = 1;
    Py_RETURN_NONE;
}

static PyObject *event_repr(EventObject *self) {
    return PyUnicode_FromFormat("<%s eid=%llu time_ns=%lld>", Py_TYPE(self)->tp_name,
                                (unsigned long long)self->eid, (long long)self->time_ns);
}

static PyMethodDef event_methods[] = {
    {"keep", (PyCFunction)event_keep, METH_NOARGS,
     "keep()\n--\n\nKeep the event's payload after the handler returns: the default destructor "
     "will not return its memory to the vmtable; the handler (or whoever holds the data) "
     "frees it later."},
    {NULL},
};

static PyGetSetDef event_getset[] = {
    {"eid", (getter)event_get_eid, NULL, "Id of the registration that received this event.", NULL},
    {"time_ns", (getter)event_get_time, NULL,
     "time.monotonic_ns() at which the engine saw the occurrence.", NULL},
    {"source", (getter)event_get_source, NULL, "The event source of the registration.", NULL},
    {"kept", (getter)event_get_kept, NULL, "True once keep() was called.", NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

#define FIELD(name, id, doc) {name, (getter)field_get, NULL, doc, (void *)(intptr_t)(id)}

static PyGetSetDef timer_fields[] = {
    FIELD("count", F_A_INT, "Expirations since the last delivery (more than 1 when late)."), {NULL}};
static PyGetSetDef fd_fields[] = {
    FIELD("fd", F_B_INT, "The file descriptor that is ready."),
    FIELD("events", F_A_INT, "The epoll event mask reported (select.EPOLLIN ...)."), {NULL}};
static PyGetSetDef accept_fields[] = {
    FIELD("conn", F_O0, "The accepted connection: a non-blocking socket.socket."),
    FIELD("addr", F_O1, "The peer's address, as socket.accept() gives it."), {NULL}};
static PyGetSetDef read_fields[] = {
    FIELD("data", F_O0, "The bytes read, in a buffer (an aem.Block from the vmtable, or bytes)."),
    FIELD("eof", F_A_BOOL, "True when the peer closed its side (data is then empty)."),
    FIELD("fd", F_B_INT, "The socket's file descriptor."), {NULL}};
static PyGetSetDef close_fields[] = {
    FIELD("fd", F_B_INT, "The socket's file descriptor."),
    FIELD("error", F_A_INT, "The socket's pending error (an errno value; 0 for a plain hang-up)."),
    {NULL}};
static PyGetSetDef signal_fields[] = {
    FIELD("signum", F_A_LOW32, "The signal number."),
    FIELD("info", F_SIGINFO, "dict(pid=..., uid=..., code=...): the sender's pid and uid when "
                             "the kernel knows them (kill, sigqueue), else None."), {NULL}};
static PyGetSetDef child_fields[] = {
    FIELD("pid", F_O0, "The process id."),
    FIELD("returncode", F_O1, "Exit status; negative: killed by that signal."),
    FIELD("job", F_O2, "Id of the registration whose job created the process, or None."),
    FIELD("error", F_O3, "The handler's exception (type, message, traceback) as text, or None."),
    {NULL}};
static PyGetSetDef file_fields[] = {
    FIELD("path", F_PATH, "The watched path."),
    FIELD("name", F_O0, "Name of the entry concerned in a watched directory, or None."),
    FIELD("mask", F_A_INT, "The inotify mask reported (aem.IN_MODIFY ...)."),
    FIELD("cookie", F_B_INT, "Links the two halves of a rename."), {NULL}};
static PyGetSetDef payload_fields[] = {FIELD("payload", F_O0, "What was passed to fire()."), {NULL}};
static PyGetSetDef pressure_fields[] = {
    FIELD("level", F_O0, "'some' or 'full': which PSI line crossed the threshold."),
    FIELD("pressure", F_O1, "The pressure file's figures when the event was delivered."), {NULL}};
static PyGetSetDef custom_fields[] = {
    FIELD("value", F_O0, "What the source's collect() produced for this occurrence."),
    FIELD("events", F_A_INT, "The epoll event mask reported."), {NULL}};
static PyGetSetDef hosted_fields[] = {
    FIELD("size", F_O0, "The request that could not be satisfied, in bytes."),
    FIELD("vmtable", F_O1, "The vmtable concerned."),
    FIELD("value", F_O2, "Extra data of the occurrence."), {NULL}};

static PyMemberDef event_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(EventObject, dict), READONLY, NULL},
    {NULL},
};

static PyType_Slot event_slots[] = {
    {Py_tp_dealloc, event_dealloc},
    {Py_tp_members, event_members},
    {Py_tp_traverse, event_traverse},
    {Py_tp_clear, event_clear},
    {Py_tp_repr, event_repr},
    {Py_tp_methods, event_methods},
    {Py_tp_getset, event_getset},
    {Py_tp_doc, "An occurrence of a registered event, handed to its handler.\n\n"
                "Carries everything the handler needs: eid, source, time_ns and the "
                "attributes of its kind (see the subclasses)."},
    {0, NULL},
};

static PyType_Spec event_spec = {
    .name = "aem.Event",
    .basicsize = sizeof(EventObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = event_slots,
};

static PyTypeObject *make_subtype(PyObject *module, const char *name, PyGetSetDef *fields,
                                  const char *doc) {
    PyType_Slot slots[] = {
        {Py_tp_getset, fields}, {Py_tp_doc, (void *)doc}, {Py_tp_traverse, event_traverse},
        {Py_tp_clear, event_clear}, {Py_tp_dealloc, event_dealloc}, {0, NULL},
    };
    PyType_Spec spec = {
        .name = name,
        .basicsize = sizeof(EventObject),
        .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
        .slots = slots,
    };
    PyObject *tp = PyType_FromModuleAndSpec(module, &spec, (PyObject *)AemEvent_Type);
    if (!tp) return NULL;
    if (PyModule_AddObjectRef(module, strrchr(name, '.') + 1, tp) < 0) {
        Py_DECREF(tp);
        return NULL;
    }
    return (PyTypeObject *)tp;
}

int aem_event_init_types(PyObject *module) {
    AemEvent_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &event_spec, NULL);
    if (!AemEvent_Type) return -1;
    if (PyModule_AddObjectRef(module, "Event", (PyObject *)AemEvent_Type) < 0) return -1;
    struct { int kind; const char *name; PyGetSetDef *fields; const char *doc; } subs[] = {
        {AEM_K_TIMER, "aem.TimerEvent", timer_fields, "An expiry of an aem.Timer."},
        {AEM_K_READABLE, "aem.FdEvent", fd_fields, "An fd became readable or writable."},
        {AEM_K_ACCEPT, "aem.AcceptEvent", accept_fields, "A connection accepted by the engine."},
        {AEM_K_READ, "aem.ReadEvent", read_fields, "Data read by the engine from a socket."},
        {AEM_K_CLOSE, "aem.CloseEvent", close_fields, "The peer hung up or the socket failed."},
        {AEM_K_SIGNAL, "aem.SignalEvent", signal_fields, "A signal delivered to the process."},
        {AEM_K_CHILD, "aem.ChildExitEvent", child_fields, "A child process ended."},
        {AEM_K_FILE, "aem.FileChangeEvent", file_fields, "inotify reported a change."},
        {AEM_K_USER, "aem.PayloadEvent", payload_fields, "An aem.UserEvent was fired."},
        {AEM_K_PRESSURE, "aem.MemoryPressureEvent", pressure_fields,
         "The kernel's PSI trigger for memory fired."},
        {AEM_K_CUSTOM, "aem.CustomEvent", custom_fields, "An occurrence of a user-defined source."},
        {AEM_K_HOSTED, "aem.ShortageEvent", hosted_fields,
         "A vmtable could not satisfy an allocation."},
    };
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        PyTypeObject *tp = make_subtype(module, subs[i].name, subs[i].fields, subs[i].doc);
        if (!tp) return -1;
        aem_event_types[subs[i].kind] = tp;
    }
    aem_event_types[AEM_K_WRITABLE] = aem_event_types[AEM_K_READABLE];
    aem_event_types[AEM_K_JOB] = aem_event_types[AEM_K_CHILD];
    Py_INCREF(aem_event_types[AEM_K_WRITABLE]);
    Py_INCREF(aem_event_types[AEM_K_JOB]);
    return 0;
}
