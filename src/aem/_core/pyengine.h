/* pyengine.h — what the three files of aem._core.Engine share (private to them):
 *   pyengine.c        the type: lifetime, registration, control, run(), introspection
 *   delivery.c        one occurrence to its handler: the per-kind work (accept, recv, reap ...),
 *                     constructor -> handler | spawn hook -> destructor, errors and back-off
 *   async_delivery.c  start()/stop(): the doorbell rings, the main thread drains
 * Names shared between them are aem_py_*; everything else stays static in its file. */
#ifndef AEM_PYENGINE_H
#define AEM_PYENGINE_H

#include "pyaem.h"

#define AEM_F_INTERNAL 0x200u  /* the engine's own plumbing: not counted for idleness */
static inline int is_internal(const aem_reg *r) { return r->flags & AEM_F_INTERNAL; }

/* What delivery needs of a registration, read before any Python code runs. */
typedef struct {
    PyObject *handler, *source, *ctor, *dtor, *pool;
    uint64_t eid;
    uint16_t flags;
    int32_t priority;
} target_t;

/* pyengine.c */
int aem_py_check_open(EngineObject *self);
PyObject *aem_py_errno_error(int neg_errno, const char *what);
void aem_py_unregister_slot(EngineObject *self, uint32_t slot);
void aem_py_forget_failures(EngineObject *self, uint64_t eid);
int aem_py_engine_step(EngineObject *self, int timeout_ms);

/* The registration delivered normally: its run of failures (if any) ends. */
static inline void source_ok(EngineObject *self, uint64_t eid) {
    if (self->failures && PyDict_GET_SIZE(self->failures)) aem_py_forget_failures(self, eid);
}

/* delivery.c */
target_t aem_py_target_of(const aem_reg *r, uint64_t eid, int32_t priority);
int aem_py_call_handler(EngineObject *self, const target_t *t, EventObject *ev);
int aem_py_deliver_one(EngineObject *self, aem_occ *o);

/* async_delivery.c */
void aem_py_direct_kick(EngineObject *self, int fd, int on);
void aem_py_stop_async(EngineObject *self, int in_child);
void aem_py_settle_owed_ring(EngineObject *self);
PyObject *aem_py_engine_start(EngineObject *self, PyObject *args);
PyObject *aem_py_engine_drain(EngineObject *self, PyObject *noargs);

#endif
