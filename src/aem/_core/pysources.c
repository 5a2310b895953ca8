/* pysources.c — the C base of aem.Timer.
 *
 * Registering millions of timers is a use case (AEM claimed millions of
 * events per CPU), so creating a Timer must cost little: the deadline data
 * lives in this C struct, validated here, and Engine.register reads it
 * directly.  aem.Timer (sources.py) subclasses it for its documentation and
 * conveniences.
 */
#include "pyaem.h"

#include <math.h>
#include <structmember.h>

PyTypeObject *AemTimerBase_Type;

/* The one conversion of a number of seconds (int or float, not bool) to nanoseconds,
 * used by Timer, run(timeout=) and the engine's internal timers.  Returns -1 with an
 * exception set for a non-number, a bool, NaN, a negative time, one beyond
 * AEM_MAX_SECONDS, or 0 when allow_zero is false. */
int64_t aem_seconds_to_ns(PyObject *v, const char *what, int allow_zero) {
    double d;
    if (PyFloat_CheckExact(v)) {
        d = PyFloat_AS_DOUBLE(v);
    } else if (PyLong_Check(v) && !PyBool_Check(v)) {
        d = PyLong_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            d = INFINITY;
        }
    } else if (PyFloat_Check(v)) {
        d = PyFloat_AsDouble(v);
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be a number of seconds (int or float), not %.100s", what,
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    if (!(d >= 0) || d > AEM_MAX_SECONDS || (!allow_zero && d == 0)) {
        PyErr_Format(PyExc_ValueError, "%s must be a number of seconds %s 0 and at most %lld "
                     "(about 285 years), got %R", what, allow_zero ? ">=" : ">",
                     (long long)AEM_MAX_SECONDS, v);
        return -1;
    }
    return (int64_t)(d * 1e9 + 0.5);
}

static PyObject *timer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"after", "interval", NULL};
    PyObject *after, *interval = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:Timer", kwlist, &after, &interval)) return NULL;
    int64_t a = aem_seconds_to_ns(after, "after", 1);
    if (a < 0) return NULL;
    int64_t i = 0;
    if (interval != Py_None && (i = aem_seconds_to_ns(interval, "interval", 0)) < 0) return NULL;
    AemTimerObject *self = (AemTimerObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->after_ns = a;
    self->interval_ns = i;
    return (PyObject *)self;
}

static PyObject *timer_get_after(AemTimerObject *self, void *c) {
    return PyFloat_FromDouble((double)self->after_ns / 1e9);
}

static PyObject *timer_get_interval(AemTimerObject *self, void *c) {
    if (!self->interval_ns) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)self->interval_ns / 1e9);
}

static PyGetSetDef timer_getset[] = {
    {"after", (getter)timer_get_after, NULL, "Seconds before the first expiry.", NULL},
    {"interval", (getter)timer_get_interval, NULL,
     "Seconds between later expiries, or None for a one-shot timer.", NULL},
    {NULL},
};

static PyMemberDef timer_members[] = {
    {"_after_ns", T_LONGLONG, offsetof(AemTimerObject, after_ns), READONLY, NULL},
    {"_interval_ns", T_LONGLONG, offsetof(AemTimerObject, interval_ns), READONLY, NULL},
    {NULL},
};

static PyType_Slot timer_slots[] = {
    {Py_tp_new, timer_new},
    {Py_tp_getset, timer_getset},
    {Py_tp_members, timer_members},
    {Py_tp_doc, "C base of aem.Timer: after and interval, in nanoseconds."},
    {0, NULL},
};

static PyType_Spec timer_spec = {
    .name = "aem._core.TimerBase",
    .basicsize = sizeof(AemTimerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = timer_slots,
};

int aem_sources_init_types(PyObject *module) {
    AemTimerBase_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &timer_spec, NULL);
    if (!AemTimerBase_Type) return -1;
    return PyModule_AddObjectRef(module, "TimerBase", (PyObject *)AemTimerBase_Type);
}
