/* process.c — small process-control calls Python's os module lacks (prctl). */
#define _GNU_SOURCE
#include "pyaem.h"

#include <sys/prctl.h>

PyObject *aem_set_child_subreaper(PyObject *module, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    if (prctl(PR_SET_CHILD_SUBREAPER, (unsigned long)on, 0, 0, 0) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyObject *aem_set_parent_death_signal(PyObject *module, PyObject *arg) {
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}
