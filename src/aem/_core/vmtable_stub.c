/* Placeholder until vmtable_py.c lands: the vmtable registers its types here. */
#include "pyaem.h"
int aem_vmtable_module_init(PyObject *module) { return 0; }
