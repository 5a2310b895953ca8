/* loop.h — between the loop's core (loop.c) and its stream I/O (loop_stream.c). */
#ifndef AEM_LOOP_H
#define AEM_LOOP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* loop.c: queue obj to be flushed at the end of this loop turn. Returns 0 or -1. */
int aem_loop_flush_later(PyObject *core, PyObject *obj);
/* loop.c: the shared read buffer (RECV_BUF bytes), or NULL with MemoryError set. */
char *aem_loop_recv_buffer(size_t *size);

/* loop_stream.c */
int aem_stream_init_type(PyObject *module);
int aem_stream_check(PyObject *obj);       /* obj is a StreamIO */
int aem_stream_flush(PyObject *io);        /* end of turn: send what was written; 0 or -1 */
PyObject *aem_stream_new(PyObject *core, PyObject *transport, int fd);

#endif
