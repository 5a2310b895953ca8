/* pyaem.h — declarations shared by the Python-facing C files of aem._core
 * (module.c, event.c, pyengine.c, delivery.c, async_delivery.c, ...).  The engine itself (engine.h) knows
 * nothing of Python. */
#ifndef AEM_PYAEM_H
#define AEM_PYAEM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sys/socket.h>

#include "doorbell.h"
#include "engine.h"

/* ---- events (event.c) -------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    uint64_t eid;
    int64_t time_ns;
    uint64_t a, b;       /* raw kind data */
    PyObject *source;    /* the registration's source, or NULL (built lazily for timers) */
    PyObject *o[4];      /* kind objects */
    PyObject *dict;      /* attributes a constructor adds */
    int64_t t_after, t_interval;  /* timer events: to rebuild the source */
    uint8_t kind;
    uint8_t kept;
} EventObject;

extern PyTypeObject *aem_event_types[AEM_K__COUNT];
extern PyTypeObject *AemEvent_Type;
int aem_event_init_types(PyObject *module);
EventObject *aem_event_new(uint8_t kind, uint64_t eid, int64_t time_ns, PyObject *source);

/* ---- the C base of aem.Timer (pysources.c) ------------------------------------- */

typedef struct {
    PyObject_HEAD
    int64_t after_ns;
    int64_t interval_ns;  /* 0: one shot */
} AemTimerObject;

extern PyTypeObject *AemTimerBase_Type;
int aem_sources_init_types(PyObject *module);

/* The longest time aem takes, in seconds (9e9 ns-representable: about 285 years). */
#define AEM_MAX_SECONDS 9e9
int64_t aem_seconds_to_ns(PyObject *v, const char *what, int allow_zero);
PyObject *aem_fetch_exception(void);  /* delivery.c: the raised exception, normalised, with its traceback */

/* ---- the engine object (pyengine.c) -------------------------------------------- */

typedef struct EngineObject {
    PyObject_HEAD
    aem_engine core;
    pid_t owner_pid;
    int closed;
    int delivering;         /* a handler runs: no nesting */
    int running;            /* run() in progress */
    unsigned long run_thread;
    unsigned long deliver_thread;
    int stop_requested;
    int busy;               /* the last turn delivered something */
    int in_step;            /* a turn (collect + deliver) is in progress */
    int wait_interrupted;   /* the last exception came from a signal handler while waiting (Ctrl-C),
                             * not from an event handler */
    int ring_owed;          /* a drain was declined: acknowledge the doorbell later */
    uint32_t internal;      /* internal registrations (not counted for idleness) */
    PyObject *error_handler;
    PyObject *spawn_hook;   /* runs handlers of EVF_FORK/EVF_CAPSULE registrations */
    PyObject *payload_hook; /* makes Read payloads (vmtable); NULL: bytes */
    PyObject *unregister_hook; /* told of each unregistration (jobs, capsules) */
    PyObject *failures;     /* eid -> consecutive engine-side failures (a dict; NULL until one) */
    PyObject *pool_hook;    /* checks the pool= of a registration (raises if unusable) */
    aem_doorbell doorbell;
    int async_on;
    pthread_t main_thread;
    pid_t main_tid;         /* async mode: fds signal this thread directly (O_ASYNC) */
    char *scratch;
    size_t scratch_cap;
    uint64_t drains, nested;
    PyObject *weakreflist;
} EngineObject;

extern PyTypeObject *AemEngine_Type;
int aem_engine_init_type(PyObject *module);
int aem_py_engine_turn(EngineObject *self, int timeout_ms);   /* asyncio loop hooks */
int aem_loop_is_waker(PyObject *handler);   /* loop_fd.c: an aem.EventLoop waker (no Event needed) */
int aem_loop_wake(PyObject *waker, uint64_t eid);  /* loop_fd.c: run it for registration eid; 0 or -1 */
int aem_py_engine_remove(EngineObject *self, uint64_t eid);
int aem_loop_init_type(PyObject *module);   /* loop.c: aem._core.LoopCore */

/* ---- module state (module.c) ---------------------------------------------------- */

extern PyObject *AemError;           /* aem.AemError */
extern PyObject *AemUnknownEvent;    /* aem.UnknownEventError */
extern PyObject *aem_socket_type;    /* socket.socket */
extern PyObject *aem_timer_type;     /* aem.sources.Timer (fast path) */
extern PyObject *aem_str_attach;     /* "_attach" */
extern PyObject *aem_str_sockargs, *aem_str_path;


/* ---- AEMhttpd's fast path in aem.Read's delivery (http_fast.c) ------------------------ */

/* The type of a Read handler that takes the bytes first (NULL until the module is set up). */
extern PyTypeObject *aem_http_hook_type;
/* 1: the bytes were answered; 0: deliver *rest (a new reference) as usual; -1: an exception. */
int aem_http_read_hook(PyObject *hook, int fd, const char *data, size_t n, int64_t time_ns, PyObject **rest);

#endif
