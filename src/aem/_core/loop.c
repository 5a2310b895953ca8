/* loop.c — aem._core.LoopCore: the hot core of aem.EventLoop (asyncio on the engine).
 *
 * What asyncio's BaseEventLoop does in Python on every callback is done here:
 *
 *   call_soon / _call_soon / _add_callback  -> a ring buffer of ready handles
 *   call_later / call_at                    -> a binary min-heap of (when, seq, handle)
 *   _run_once                               -> drop cancelled timers, wait (the selector:
 *                                              one aem engine turn), move due timers to
 *                                              the ready ring, run what was ready
 *
 * The handles are asyncio's own classes (asyncio.Handle, asyncio.TimerHandle),
 * allocated here and filled through their __slots__ (the slot offsets are read
 * from the classes' member descriptors once), so isinstance checks, cancel(),
 * repr() and every other use of them by asyncio and by programs work unchanged.
 * Each handle runs in its contextvars context; an exception goes to the loop's
 * exception handler through loop._aem_report (SystemExit and KeyboardInterrupt
 * propagate, as in asyncio).  Debug mode runs handles through loop._aem_run_debug
 * (slow-callback warnings) and the loop's Python call_soon/call_at (source
 * tracebacks).
 *
 * The fds' side (wakers, reads) is loop_fd.c; the stream transport's I/O is loop_stream.c.
 *
 * Ties: timers due at the same instant run in the order they were scheduled.
 * Errors: functions return 0 or a negative value with a Python exception set.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <sys/socket.h>
#include <string.h>
#include <time.h>

#include "heap.h"
#include "loop.h"

static PyTypeObject *LoopCore_Type;
static PyObject *str_stopping, *str_flush, *str_debug, *kw_loop;

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

Py_ssize_t off_callback = -1, off_args, off_cancelled, off_loop, off_source_tb, off_repr, off_context,
    off_scheduled, off_when;

/* ---- slot offsets --------------------------------------------------------------------------- */

static int slot_offset(PyObject *cls, const char *name, Py_ssize_t *out) {
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (!d) return -1;
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%R.%s is not a slot: this asyncio is not supported", cls, name);
        Py_DECREF(d);
        return -1;
    }
    *out = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return 0;
}

static int read_offsets(PyObject *handle_type, PyObject *timer_type) {
    if (off_callback >= 0) return 0;
    Py_ssize_t cb;
    if (slot_offset(handle_type, "_callback", &cb) < 0 || slot_offset(handle_type, "_args", &off_args) < 0 ||
        slot_offset(handle_type, "_cancelled", &off_cancelled) < 0 ||
        slot_offset(handle_type, "_loop", &off_loop) < 0 ||
        slot_offset(handle_type, "_source_traceback", &off_source_tb) < 0 ||
        slot_offset(handle_type, "_repr", &off_repr) < 0 ||
        slot_offset(handle_type, "_context", &off_context) < 0 ||
        slot_offset(timer_type, "_scheduled", &off_scheduled) < 0 ||
        slot_offset(timer_type, "_when", &off_when) < 0)
        return -1;
    off_callback = cb;
    return 0;
}


/* While a handle made here waits in the ring or the heap, it and its own copy of the
 * context are hidden from the cyclic GC: the loop's reference keeps them alive anyway, and
 * a million scheduled handles would otherwise be walked by every collection (measured: the
 * GC costs more than everything else in scheduling 1M callbacks).  When a handle leaves the
 * loop it is tracked again, with its context, always: deallocators (the context's) expect a
 * tracked object. */
static inline void hide(PyObject *h, int own_context) {
    PyObject_GC_UnTrack(h);
    if (own_context) PyObject_GC_UnTrack(SLOT(h, off_context));
}

static inline void unhide(PyObject *h) {
    if (PyObject_GC_IsTracked(h)) return;
    PyObject *ctx = SLOT(h, off_context);
    if (ctx && !PyObject_GC_IsTracked(ctx)) PyObject_GC_Track(ctx);
    PyObject_GC_Track(h);
}

/* Drop the loop's reference to a handle that leaves it. */
static inline void release(PyObject *h) {
    unhide(h);
    Py_DECREF(h);
}

/* A handle that ran and leaves the loop: when nothing else refers to it (the usual case: a
 * Future's callbacks and most callers drop what call_soon returns) it is emptied and kept for
 * the next call_soon, untracked by the GC, instead of being freed and allocated again
 * (asyncio.Handle is a Python class: its allocation and deallocation are the generic, slow ones).
 * Nothing can tell: no reference, and no weak reference, to it is left. */
static void recycle(LoopCoreObject *self, PyObject *h) {
    /* where its weak references are listed: a slot (3.11), or before the object (a negative
     * offset: 3.12+ "managed" weak references, which asyncio.Handle has there) */
    Py_ssize_t wl = Py_TYPE(h)->tp_weaklistoffset;
    if (Py_REFCNT(h) != 1 || !Py_IS_TYPE(h, self->handle_type) || self->nspare == LOOP_SPARE_HANDLES ||
        (wl != 0 && *(PyObject **)((char *)h + wl))) {
        release(h);
        return;
    }
    PyObject *ctx = SLOT(h, off_context);
    if (ctx && !PyObject_GC_IsTracked(ctx)) PyObject_GC_Track(ctx);
    PyObject_GC_UnTrack(h);
    /* may run code (finalizers): h is still only ours */
    Py_CLEAR(SLOT(h, off_callback));
    Py_CLEAR(SLOT(h, off_args));
    Py_CLEAR(SLOT(h, off_context));
    Py_CLEAR(SLOT(h, off_loop));
    Py_CLEAR(SLOT(h, off_cancelled));
    Py_CLEAR(SLOT(h, off_repr));
    Py_CLEAR(SLOT(h, off_source_tb));
    if (self->nspare < LOOP_SPARE_HANDLES) {
        self->spare[self->nspare++] = h;
    } else {
        PyObject_GC_Track(h);
        Py_DECREF(h);
    }
}

static void spares_clear(LoopCoreObject *self) {
    while (self->nspare) {
        PyObject *h = self->spare[--self->nspare];
        PyObject_GC_Track(h);
        Py_DECREF(h);
    }
}

/* A new handle of `type` with every slot of asyncio.Handle set (steals nothing). */
static PyObject *new_handle(LoopCoreObject *self, PyTypeObject *type, PyObject *callback,
                            PyObject *args, PyObject *context) {
    PyObject *h = type == self->handle_type && self->nspare ? self->spare[--self->nspare]
                                                           : type->tp_alloc(type, 0);
    if (!h) return NULL;
    int own_context = context == NULL || context == Py_None;
    if (own_context) {
        context = PyContext_CopyCurrent();
        if (!context) {
            if (!PyObject_GC_IsTracked(h)) PyObject_GC_Track(h);  /* a spare */
            Py_DECREF(h);
            return NULL;
        }
    } else {
        Py_INCREF(context);
    }
    SLOT(h, off_context) = context;
    SLOT(h, off_loop) = Py_NewRef(self->loop);
    SLOT(h, off_callback) = Py_NewRef(callback);
    SLOT(h, off_args) = Py_NewRef(args);
    SLOT(h, off_cancelled) = Py_NewRef(Py_False);
    SLOT(h, off_repr) = Py_NewRef(Py_None);
    SLOT(h, off_source_tb) = Py_NewRef(Py_None);
    if (type == self->handle_type) hide(h, own_context);  /* timers: hidden once fully made */
    return h;
}

/* ---- the ready ring ---------------------------------------------------------------------------- */

int aem_loop_ring_push(LoopCoreObject *self, PyObject *h) {  /* takes a new reference */
    if (self->len == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 1024;
        PyObject **r = PyMem_Malloc(sizeof(PyObject *) * (size_t)cap);
        if (!r) {
            Py_DECREF(h);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < self->len; i++) r[i] = self->ring[(self->head + i) & (self->cap - 1)];
        PyMem_Free(self->ring);
        self->ring = r;
        self->head = 0;
        self->cap = cap;
    }
    self->ring[(self->head + self->len) & (self->cap - 1)] = h;
    self->len++;
    return 0;
}

static PyObject *ring_pop(LoopCoreObject *self) {  /* returns the reference */
    PyObject *h = self->ring[self->head];
    self->head = (self->head + 1) & (self->cap - 1);
    self->len--;
    return h;
}

static void ring_clear(LoopCoreObject *self) {
    while (self->len) release(ring_pop(self));
}

/* ---- the timer heap ------------------------------------------------------------------------------ */

static inline int tbefore(const tent *a, const tent *b) {
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

/* The engine's one binary heap (heap.h); a timer's slot is not tracked (cancelled ones are pruned). */
AEM_HEAP_DEFINE(lheap, tent, tbefore, AEM_HEAP_NOT_TRACKED)

static int heap_push(LoopCoreObject *self, double when, PyObject *h) {  /* takes a new reference */
    if (lheap_grow(&self->heap, &self->hcap, self->hlen) < 0) {
        Py_DECREF(h);
        PyErr_NoMemory();
        return -1;
    }
    lheap_sift_up(self, self->heap, self->hlen++, (tent){.when = when, .seq = self->seq++, .handle = h});
    Py_SETREF(SLOT(h, off_scheduled), Py_NewRef(Py_True));
    return 0;
}

static PyObject *heap_pop(LoopCoreObject *self) {  /* returns the reference */
    PyObject *h = self->heap[0].handle;
    lheap_remove_at(self, self->heap, &self->hlen, 0);
    Py_SETREF(SLOT(h, off_scheduled), Py_NewRef(Py_False));
    return h;
}

static void heap_clear(LoopCoreObject *self) {
    while (self->hlen) release(heap_pop(self));
    self->cancelled = 0;
}

/* Drop cancelled timers: all of them when they are many, else those at the top. */
static void heap_prune(LoopCoreObject *self) {
    if (self->hlen > 100 && self->cancelled * 2 > self->hlen) {
        uint32_t k = 0;
        for (uint32_t i = 0; i < self->hlen; i++) {
            PyObject *h = self->heap[i].handle;
            if (is_cancelled(h)) {
                Py_SETREF(SLOT(h, off_scheduled), Py_NewRef(Py_False));
                release(h);
            } else {
                self->heap[k++] = self->heap[i];
            }
        }
        self->hlen = k;
        for (uint32_t i = k / 2; i-- > 0;) lheap_sift_down(self, self->heap, k, i, self->heap[i]);
        self->cancelled = 0;
        return;
    }
    while (self->hlen && is_cancelled(self->heap[0].handle)) {
        self->cancelled--;
        release(heap_pop(self));
    }
}

/* ---- methods: scheduling -------------------------------------------------------------------------- */

static int check_closed(LoopCoreObject *self) {
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
        return -1;
    }
    return 0;
}

/* Parse (fixed..., callback, *args, context=None): the args tuple and the context. */
static int parse_cb(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t fixed,
                    const char *name, PyObject **tuple, PyObject **context) {
    *context = NULL;
    if (nargs < fixed + 1) {
        PyErr_Format(PyExc_TypeError, "%s() missing required positional arguments", name);
        return -1;
    }
    if (kwnames) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i);
            if (!PyUnicode_Check(k) || PyUnicode_CompareWithASCIIString(k, "context") != 0) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", name, k);
                return -1;
            }
            *context = args[nargs + i];
        }
    }
    Py_ssize_t n = nargs - fixed - 1;
    *tuple = PyTuple_New(n);
    if (!*tuple) return -1;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(*tuple, i, Py_NewRef(args[fixed + 1 + i]));
    return 0;
}

static PyObject *soon(LoopCoreObject *self, PyObject *callback, PyObject *tuple, PyObject *context) {
    PyObject *h = new_handle(self, self->handle_type, callback, tuple, context);
    if (!h) return NULL;
    if (aem_loop_ring_push(self, Py_NewRef(h)) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

/* call_soon(callback, *args, context=None) */
static PyObject *core_call_soon(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    PyObject *tuple, *context;
    if (check_closed(self) < 0 || parse_cb(args, nargs, kwnames, 0, "call_soon", &tuple, &context) < 0)
        return NULL;
    PyObject *h = soon(self, args[0], tuple, context);
    Py_DECREF(tuple);
    return h;
}

/* handle(callback, args): a new asyncio.Handle in the current context, not queued (a reader's). */
static PyObject *core_handle(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "handle(callback, args: tuple)");
        return NULL;
    }
    PyObject *h = new_handle(self, self->handle_type, args[0], args[1], NULL);
    if (h) unhide(h);  /* an ordinary handle from now on: the GC sees it */
    return h;
}

/* _call_soon(callback, args, context): asyncio's internal entry (call_soon_threadsafe ...). */
static PyObject *core__call_soon(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_call_soon(callback, args: tuple, context)");
        return NULL;
    }
    return soon(self, args[0], args[1], args[2]);
}

static PyObject *schedule(LoopCoreObject *self, double when, PyObject *when_obj, PyObject *const *args,
                          Py_ssize_t nargs, PyObject *kwnames, const char *name) {
    PyObject *tuple, *context;
    if (check_closed(self) < 0 || parse_cb(args, nargs, kwnames, 1, name, &tuple, &context) < 0) return NULL;
    PyObject *h = new_handle(self, self->timer_type, args[1], tuple, context);
    Py_DECREF(tuple);
    if (!h) return NULL;
    SLOT(h, off_when) = when_obj;  /* the reference is the caller's, given to the handle */
    SLOT(h, off_scheduled) = Py_NewRef(Py_False);
    hide(h, context == NULL || context == Py_None);
    if (heap_push(self, when, Py_NewRef(h)) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

static int as_seconds(PyObject *o, const char *what, double *out) {
    if (o == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s cannot be None", what);
        return -1;
    }
    *out = PyFloat_AsDouble(o);
    if (*out == -1.0 && PyErr_Occurred()) return -1;
    if (*out != *out) {
        PyErr_Format(PyExc_ValueError, "%s is NaN", what);
        return -1;
    }
    return 0;
}

/* call_later(delay, callback, *args, context=None) */
static PyObject *core_call_later(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    double delay;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "call_later() missing required argument 'delay'");
        return NULL;
    }
    if (args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "delay must not be None");
        return NULL;
    }
    if (as_seconds(args[0], "delay", &delay) < 0) return NULL;
    double when = now_s() + delay;
    PyObject *w = PyFloat_FromDouble(when);
    if (!w) return NULL;
    PyObject *h = schedule(self, when, w, args, nargs, kwnames, "call_later");
    if (!h) Py_DECREF(w);
    return h;
}

/* call_at(when, callback, *args, context=None) */
static PyObject *core_call_at(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames) {
    double when;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "call_at() missing required argument 'when'");
        return NULL;
    }
    if (as_seconds(args[0], "when", &when) < 0) return NULL;
    PyObject *h = schedule(self, when, Py_NewRef(args[0]), args, nargs, kwnames, "call_at");
    if (!h) Py_DECREF(args[0]);
    return h;
}

/* _add_callback(handle): a ready handle made elsewhere (selector events, debug mode). */
static PyObject *core_add_callback(LoopCoreObject *self, PyObject *h) {
    if (!PyObject_TypeCheck(h, self->handle_type)) {
        PyErr_SetString(PyExc_TypeError, "_add_callback() needs an asyncio.Handle");
        return NULL;
    }
    if (!is_cancelled(h) && aem_loop_ring_push(self, Py_NewRef(h)) < 0) return NULL;
    Py_RETURN_NONE;
}

/* _push_timer(timer_handle): a TimerHandle made elsewhere (debug mode's call_at). */
static PyObject *core_push_timer(LoopCoreObject *self, PyObject *h) {
    if (!PyObject_TypeCheck(h, self->timer_type)) {
        PyErr_SetString(PyExc_TypeError, "_push_timer() needs an asyncio.TimerHandle");
        return NULL;
    }
    double when;
    if (as_seconds(SLOT(h, off_when), "when", &when) < 0) return NULL;
    if (heap_push(self, when, Py_NewRef(h)) < 0) return NULL;
    Py_RETURN_NONE;
}

/* _timer_handle_cancelled(handle): TimerHandle.cancel() tells the loop. */
static PyObject *core_timer_cancelled(LoopCoreObject *self, PyObject *h) {
    if (PyObject_TypeCheck(h, self->timer_type) && SLOT(h, off_scheduled) == Py_True) self->cancelled++;
    Py_RETURN_NONE;
}

static PyObject *core_time(LoopCoreObject *self, PyObject *unused) { return PyFloat_FromDouble(now_s()); }

/* create_future(): asyncio.Future(loop=loop), as BaseEventLoop.create_future, without its frame. */
static PyObject *core_create_future(LoopCoreObject *self, PyObject *unused) {
    PyObject *args[] = {self->loop};
    return PyObject_Vectorcall(self->future_type, args, 0, kw_loop);
}

/* get_debug(): loop._debug (read at its slot); every asyncio.Future made asks it. */
static PyObject *core_get_debug(LoopCoreObject *self, PyObject *unused) {
    PyObject *d = self->off_debug >= 0 ? SLOT(self->loop, self->off_debug) : NULL;
    return d ? Py_NewRef(d) : PyObject_GetAttr(self->loop, str_debug);
}

/* ---- the turn --------------------------------------------------------------------------------------- */

static int run_handle(LoopCoreObject *self, PyObject *h) {
    if (self->debug) {
        PyObject *r = PyObject_CallOneArg(self->run_debug, h);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    PyObject *cb = Py_NewRef(SLOT(h, off_callback));
    PyObject *a = Py_NewRef(SLOT(h, off_args));
    PyObject *ctx = Py_NewRef(SLOT(h, off_context));
    PyObject *r = NULL;
    if (PyContext_Enter(ctx) == 0) {
        r = PyObject_Vectorcall(cb, &PyTuple_GET_ITEM(a, 0), (size_t)PyTuple_GET_SIZE(a), NULL);
        if (PyContext_Exit(ctx) < 0) Py_CLEAR(r);
    }
    Py_DECREF(cb);
    Py_DECREF(a);
    Py_DECREF(ctx);
    if (r) {
        Py_DECREF(r);
        return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) return -1;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb && exc) PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (!exc) exc = Py_NewRef(Py_None);
    PyObject *rr = PyObject_CallFunctionObjArgs(self->report, h, exc, NULL);
    Py_DECREF(exc);
    Py_XDECREF(rr);
    return rr ? 0 : -1;
}

/* End of a turn: every transport that wrote sends what it wrote, in one writev (its _aem_flush).
 * The queue is taken from the front; a flush may queue more (run too) or flush re-entrantly
 * (flush_now): both take the next entry.  After an error the rest stays queued. */
static int flush_writes(LoopCoreObject *self) {
    while (self->flush_head < self->nflush) {
        PyObject *item = self->to_flush[self->flush_head];  /* the queue's reference, now ours */
        self->to_flush[self->flush_head++] = NULL;
        int rc = 0;
        if (aem_stream_check(item)) {
            rc = aem_stream_flush(item);
        } else {
            PyObject *r = PyObject_CallMethodNoArgs(item, str_flush);
            rc = r ? 0 : -1;
            Py_XDECREF(r);
        }
        Py_DECREF(item);
        if (rc < 0) return -1;
    }
    self->flush_head = self->nflush = 0;
    return 0;
}

int aem_loop_flush_later(PyObject *core, PyObject *obj) {
    LoopCoreObject *self = (LoopCoreObject *)core;
    if (self->nflush == self->flushcap) {
        if (self->flush_head) {  /* slide the unflushed part to the front */
            Py_ssize_t k = self->nflush - self->flush_head;
            memmove(self->to_flush, self->to_flush + self->flush_head, sizeof(PyObject *) * (size_t)k);
            self->flush_head = 0;
            self->nflush = k;
        } else {
            Py_ssize_t cap = self->flushcap ? self->flushcap * 2 : 16;
            PyObject **q = PyMem_Realloc(self->to_flush, sizeof(PyObject *) * (size_t)cap);
            if (!q) {
                PyErr_NoMemory();
                return -1;
            }
            self->to_flush = q;
            self->flushcap = cap;
        }
    }
    self->to_flush[self->nflush++] = Py_NewRef(obj);
    return 0;
}

static void flush_clear(LoopCoreObject *self) {
    while (self->flush_head < self->nflush) {
        PyObject *item = self->to_flush[self->flush_head];
        self->to_flush[self->flush_head++] = NULL;
        Py_DECREF(item);
    }
    self->flush_head = self->nflush = 0;
}

/* flush_later(transport): call transport._aem_flush() at the end of this turn. */
static PyObject *core_flush_later(LoopCoreObject *self, PyObject *transport) {
    if (aem_loop_flush_later((PyObject *)self, transport) < 0) return NULL;
    Py_RETURN_NONE;
}

/* stream_io(transport, fd) -> the StreamIO of a stream transport of this loop (loop_stream.c). */
static PyObject *core_stream_io(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stream_io(transport, fd)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[1]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return NULL;
    }
    return aem_stream_new((PyObject *)self, args[0], (int)fd);
}

/* flush_now(): what flush_later queued, now (the loop stops with writes pending, ...). */
static PyObject *core_flush_now(LoopCoreObject *self, PyObject *unused) {
    return flush_writes(self) < 0 ? NULL : Py_NewRef(Py_None);
}

/* _run_once(): one iteration of asyncio's loop (BaseEventLoop._run_once).
 *
 * Bounded poll skipping: while callbacks are ready (and the loop is not stopping) the wait for
 * I/O -- a non-blocking engine turn, one epoll_wait(0) syscall, most of what a one-callback turn
 * costs -- is skipped, but never for more than LOOP_POLL_TURNS turns in a row nor past
 * LOOP_POLL_NS nanoseconds since the last poll: a fd that becomes ready while callbacks keep
 * coming is served at most LOOP_POLL_TURNS turns (or one turn after LOOP_POLL_NS) later. Timers
 * are still moved to the ready queue on every turn.  asyncio's loop polls on every turn.  The
 * first turn of each _run_once call always polls: what was ready when run_forever started (or
 * when Python code ran between the calls) is served in that first turn, as asyncio serves it. */
static PyObject *one_turn(LoopCoreObject *self, int stopping, int must_poll) {
    self->turns++;
    heap_prune(self);
    double now = now_s();
    if (self->len && !stopping && !must_poll && self->skipped + 1 < LOOP_POLL_TURNS &&
        now - self->last_poll < LOOP_POLL_NS * 1e-9) {
        self->skipped++;
        goto collected;
    }
    self->skipped = 0;
    self->last_poll = now;
    PyObject *timeout;
    if (self->engine) {  /* one engine turn: the loop's wakers queue the ready fds' handles */
        int ms = -1;
        if (self->len || stopping) {
            ms = 0;
        } else if (self->hlen) {
            double t = self->heap[0].when - now;
            ms = t <= 0 ? 0 : t > 86400 ? 86400000 : (int)(t * 1e3 + 0.999999);
        }
        aem_loop_unpark(self);  /* what wakers parked outside a turn is watched again */
        self->in_turn = 1;
        int n = aem_py_engine_turn(self->engine, ms);
        self->in_turn = 0;
        if (n < 0) return NULL;
        now = now_s();
        self->last_poll = now;  /* when the poll returned: a blocking wait is not time between polls */
        goto collected;
    }
    if (self->len || stopping) {
        timeout = PyFloat_FromDouble(0.0);
    } else if (self->hlen) {
        double t = self->heap[0].when - now;
        timeout = PyFloat_FromDouble(t < 0 ? 0 : t > 86400 ? 86400 : t);
    } else {
        timeout = Py_NewRef(Py_None);
    }
    if (!timeout) return NULL;
    PyObject *events = PyObject_CallOneArg(self->select, timeout);
    Py_DECREF(timeout);
    if (!events) return NULL;
    if (!(PyList_Check(events) && PyList_GET_SIZE(events) == 0)) {
        PyObject *r = PyObject_CallOneArg(self->process_events, events);
        Py_DECREF(events);
        if (!r) return NULL;
        Py_DECREF(r);
    } else {
        Py_DECREF(events);
    }
    now = now_s();
    self->last_poll = now;
collected:;
    double end = now + self->clock_resolution;
    while (self->hlen && self->heap[0].when < end) {
        PyObject *h = heap_pop(self);
        if (is_cancelled(h)) {
            self->cancelled--;
            release(h);
        } else if (aem_loop_ring_push(self, h) < 0) {
            return NULL;
        }
    }
    Py_ssize_t ntodo = self->len;
    for (Py_ssize_t i = 0; i < ntodo && self->len; i++) {
        PyObject *h = ring_pop(self);
        int rc = is_cancelled(h) ? 0 : run_handle(self, h);
        recycle(self, h);
        if (rc < 0) return NULL;
    }
    return flush_writes(self) < 0 ? NULL : Py_NewRef(Py_None);
}

/* loop._stopping, twice a turn: aem.EventLoop has it as a slot, read at its offset. */
static int is_stopping(LoopCoreObject *self) {
    PyObject *s = self->off_stopping >= 0 ? SLOT(self->loop, self->off_stopping) : NULL;
    if (s == Py_False) return 0;
    if (s == Py_True) return 1;
    if (s) return PyObject_IsTrue(s);
    s = PyObject_GetAttr(self->loop, str_stopping);
    if (!s) return -1;
    int stopping = PyObject_IsTrue(s);
    Py_DECREF(s);
    return stopping;
}

/* _run_once(): turns of the loop, as asyncio's run_forever runs them (`while True: _run_once();
 * if _stopping: break`), up to TURNS_PER_CALL of them while the loop is not stopping: the
 * Python-level loop around each turn is most of what a turn costs when a callback is all it runs. */
#define TURNS_PER_CALL 256

static PyObject *core_run_once(LoopCoreObject *self, PyObject *unused) {
    for (int k = 0;; k++) {
        int stopping = is_stopping(self);
        if (stopping < 0) return NULL;
        if (stopping && k > 0) Py_RETURN_NONE;
        PyObject *r = one_turn(self, stopping, k == 0);
        if (!r || k + 1 == TURNS_PER_CALL) return r;
        Py_DECREF(r);
    }
}

/* ---- the engine fast path: wakers -------------------------------------------------------------------- */

/* _attach_engine(engine, fd_to_key, remove_reader, remove_writer): from now on a turn is one
 * engine turn, and the selector registers wakers (below) as the handlers of the loop's fds. */
static PyObject *core_attach_engine(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyObject_TypeCheck(args[0], AemEngine_Type) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_attach_engine(engine, fd_to_key: dict, remove_reader, remove_writer)");
        return NULL;
    }
    aem_loop_unpark(self);
    Py_XSETREF(self->engine, (EngineObject *)Py_NewRef(args[0]));
    Py_XSETREF(self->fd_to_key, Py_NewRef(args[1]));
    Py_XSETREF(self->remove_fd[0], Py_NewRef(args[2]));
    Py_XSETREF(self->remove_fd[1], Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

/* waker(fd, write) -> the engine handler for fd's readiness to read (write=False) or write. */
static PyObject *core_waker(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return aem_loop_waker(self, args, nargs);
}

static PyObject *core_accept(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return aem_loop_accept(args, nargs);
}

static PyObject *core_recv(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return aem_loop_recv(args, nargs);
}

/* ---- the rest: sizes, clearing, state ----------------------------------------------------------------- */

static PyObject *core_clear(LoopCoreObject *self, PyObject *unused) {
    ring_clear(self);
    Py_RETURN_NONE;
}

static PyObject *core_clear_timers(LoopCoreObject *self, PyObject *unused) {
    heap_clear(self);
    Py_RETURN_NONE;
}

static PyObject *core_append(LoopCoreObject *self, PyObject *h) {
    if (aem_loop_ring_push(self, Py_NewRef(h)) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_popleft(LoopCoreObject *self, PyObject *unused) {
    if (!self->len) {
        PyErr_SetString(PyExc_IndexError, "pop from an empty ready queue");
        return NULL;
    }
    PyObject *h = ring_pop(self);
    unhide(h);
    return h;
}

static PyObject *core_timers(LoopCoreObject *self, PyObject *unused) {
    PyObject *l = PyList_New(self->hlen);
    if (!l) return NULL;
    for (uint32_t i = 0; i < self->hlen; i++) PyList_SET_ITEM(l, i, Py_NewRef(self->heap[i].handle));
    return l;
}

static PyObject *core_set_state(LoopCoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"closed", "debug", NULL};
    int closed = self->closed, debug = self->debug;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pp:_set_state", kwlist, &closed, &debug)) return NULL;
    self->closed = closed;
    self->debug = debug;
    Py_RETURN_NONE;
}

static Py_ssize_t core_len(LoopCoreObject *self) { return self->len; }

static PyObject *core_get_ntimers(LoopCoreObject *self, void *unused) { return PyLong_FromUnsignedLong(self->hlen); }
static PyObject *core_get_streams_fed(LoopCoreObject *self, void *unused) {
    return PyLong_FromUnsignedLongLong(aem_feed_count());
}
static PyObject *core_get_ncancelled(LoopCoreObject *self, void *unused) {
    return PyLong_FromSsize_t(self->cancelled);
}

/* LoopCore(loop, handle_type, timer_type, select, process_events, report, run_debug, clock_resolution) */
static int core_init(LoopCoreObject *self, PyObject *args, PyObject *kwds) {
    PyObject *loop, *ht, *tt, *sel, *pe, *rep, *rd;
    double res;
    if (!PyArg_ParseTuple(args, "OO!O!OOOOd:LoopCore", &loop, &PyType_Type, &ht, &PyType_Type, &tt, &sel,
                          &pe, &rep, &rd, &res))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)tt, (PyTypeObject *)ht)) {
        PyErr_SetString(PyExc_TypeError, "the timer handle type must derive from the handle type");
        return -1;
    }
    if (read_offsets(ht, tt) < 0) return -1;
    Py_XSETREF(self->loop, Py_NewRef(loop));
    self->off_stopping = aem_slot_offset(Py_TYPE(loop), str_stopping);  /* -1: by getattr() */
    self->off_debug = aem_slot_offset(Py_TYPE(loop), str_debug);
    if (!self->future_type) {
        PyObject *m = PyImport_ImportModule("asyncio.futures");
        if (!m) return -1;
        self->future_type = PyObject_GetAttrString(m, "Future");
        Py_DECREF(m);
        if (!self->future_type) return -1;
    }
    Py_XSETREF(self->handle_type, (PyTypeObject *)Py_NewRef(ht));
    Py_XSETREF(self->timer_type, (PyTypeObject *)Py_NewRef(tt));
    Py_XSETREF(self->select, Py_NewRef(sel));
    Py_XSETREF(self->process_events, Py_NewRef(pe));
    Py_XSETREF(self->report, Py_NewRef(rep));
    Py_XSETREF(self->run_debug, Py_NewRef(rd));
    self->clock_resolution = res;
    return 0;
}

static int core_traverse(LoopCoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->loop);
    Py_VISIT(self->handle_type);
    Py_VISIT(self->timer_type);
    Py_VISIT(self->select);
    Py_VISIT(self->process_events);
    Py_VISIT(self->report);
    Py_VISIT(self->run_debug);
    Py_VISIT(self->future_type);
    Py_VISIT(self->engine);
    for (Py_ssize_t i = self->flush_head; i < self->nflush; i++) Py_VISIT(self->to_flush[i]);
    Py_VISIT(self->fd_to_key);
    Py_VISIT(self->remove_fd[0]);
    Py_VISIT(self->remove_fd[1]);
    for (Py_ssize_t i = 0; i < self->len; i++) Py_VISIT(self->ring[(self->head + i) & (self->cap - 1)]);
    for (uint32_t i = 0; i < self->hlen; i++) Py_VISIT(self->heap[i].handle);
    return 0;
}

static int core_clear_refs(LoopCoreObject *self) {
    ring_clear(self);
    spares_clear(self);
    heap_clear(self);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->handle_type);
    Py_CLEAR(self->timer_type);
    Py_CLEAR(self->select);
    Py_CLEAR(self->process_events);
    Py_CLEAR(self->report);
    Py_CLEAR(self->run_debug);
    Py_CLEAR(self->future_type);
    self->nparked = 0;
    Py_CLEAR(self->engine);
    flush_clear(self);
    Py_CLEAR(self->fd_to_key);
    Py_CLEAR(self->remove_fd[0]);
    Py_CLEAR(self->remove_fd[1]);
    return 0;
}

static void core_dealloc(LoopCoreObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    core_clear_refs(self);
    PyMem_Free(self->ring);
    free(self->heap);  /* heap.h's grow reallocs with the C allocator */
    PyMem_Free(self->parked);
    PyMem_Free(self->to_flush);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef core_methods[] = {
    {"call_soon", (PyCFunction)(void (*)(void))core_call_soon, METH_FASTCALL | METH_KEYWORDS,
     "call_soon(callback, *args, context=None) -> asyncio.Handle"},
    {"call_later", (PyCFunction)(void (*)(void))core_call_later, METH_FASTCALL | METH_KEYWORDS,
     "call_later(delay, callback, *args, context=None) -> asyncio.TimerHandle"},
    {"call_at", (PyCFunction)(void (*)(void))core_call_at, METH_FASTCALL | METH_KEYWORDS,
     "call_at(when, callback, *args, context=None) -> asyncio.TimerHandle"},
    {"_call_soon", (PyCFunction)(void (*)(void))core__call_soon, METH_FASTCALL,
     "_call_soon(callback, args, context) -> asyncio.Handle"},
    {"handle", (PyCFunction)(void (*)(void))core_handle, METH_FASTCALL,
     "handle(callback, args) -> asyncio.Handle in the current context, not queued."},
    {"_add_callback", (PyCFunction)core_add_callback, METH_O, "Queue a ready handle (unless cancelled)."},
    {"_push_timer", (PyCFunction)core_push_timer, METH_O, "Schedule a TimerHandle made elsewhere."},
    {"_timer_handle_cancelled", (PyCFunction)core_timer_cancelled, METH_O, "A scheduled timer was cancelled."},
    {"time", (PyCFunction)core_time, METH_NOARGS, "time() -> float: the loop's clock (CLOCK_MONOTONIC)."},
    {"create_future", (PyCFunction)core_create_future, METH_NOARGS, "create_future() -> asyncio.Future(loop=loop)"},
    {"get_debug", (PyCFunction)core_get_debug, METH_NOARGS, "get_debug() -> loop._debug"},
    {"_run_once", (PyCFunction)core_run_once, METH_NOARGS, "One iteration of the loop."},
    {"flush_later", (PyCFunction)core_flush_later, METH_O,
     "flush_later(transport): transport._aem_flush() at the end of this turn."},
    {"stream_io", (PyCFunction)(void (*)(void))core_stream_io, METH_FASTCALL,
     "stream_io(transport, fd) -> the C reads and coalesced writes of a stream transport."},
    {"flush_now", (PyCFunction)core_flush_now, METH_NOARGS, "Run the flushes flush_later queued, now."},
    {"_attach_engine", (PyCFunction)(void (*)(void))core_attach_engine, METH_FASTCALL,
     "_attach_engine(engine, fd_to_key, remove_reader, remove_writer): turns are engine turns."},
    {"waker", (PyCFunction)(void (*)(void))core_waker, METH_FASTCALL,
     "waker(fd, write) -> the engine handler that queues fd's reader (or writer) handle."},
    {"accept", (PyCFunction)(void (*)(void))core_accept, METH_FASTCALL,
     "accept(fd) -> (conn_fd, address) | None: one pending connection (close-on-exec), None if none is."},
    {"recv", (PyCFunction)(void (*)(void))core_recv, METH_FASTCALL,
     "recv(fd, max_size) -> bytes: one read of a socket, into a shared buffer."},
    {"append", (PyCFunction)core_append, METH_O, "Queue a ready handle."},
    {"popleft", (PyCFunction)core_popleft, METH_NOARGS, "Take the first ready handle."},
    {"clear", (PyCFunction)core_clear, METH_NOARGS, "Drop every ready handle."},
    {"clear_timers", (PyCFunction)core_clear_timers, METH_NOARGS, "Drop every scheduled timer."},
    {"timers", (PyCFunction)core_timers, METH_NOARGS, "The scheduled TimerHandles (heap order)."},
    {"_set_state", (PyCFunction)(void (*)(void))core_set_state, METH_VARARGS | METH_KEYWORDS,
     "_set_state(closed=..., debug=...)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"ntimers", (getter)core_get_ntimers, NULL, "Timers in the heap (cancelled ones included).", NULL},
    {"ncancelled", (getter)core_get_ncancelled, NULL, "Cancelled timers still in the heap.", NULL},
    {"streams_fed", (getter)core_get_streams_fed, NULL,
     "Reads handed to a StreamReaderProtocol's reader in C so far (every loop of the process).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot core_slots[] = {
    {Py_tp_doc, "The hot core of aem.EventLoop: ready queue, timer heap, the loop's turn."},
    {Py_tp_init, core_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear_refs},
    {Py_tp_methods, core_methods},
    {Py_tp_getset, core_getset},
    {Py_sq_length, core_len},
    {Py_mp_length, core_len},
    {0, NULL},
};

static PyType_Spec core_spec = {
    .name = "aem._core.LoopCore",
    .basicsize = sizeof(LoopCoreObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = core_slots,
};

int aem_loop_init_type(PyObject *module) {
    str_stopping = PyUnicode_InternFromString("_stopping");
    str_flush = PyUnicode_InternFromString("_aem_flush");
    str_debug = PyUnicode_InternFromString("_debug");
    kw_loop = Py_BuildValue("(s)", "loop");
    if (!str_stopping || !str_flush || !str_debug || !kw_loop) return -1;
    if (aem_stream_init_type(module) < 0) return -1;
    if (aem_loop_waker_init_type(module) < 0) return -1;
    LoopCore_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &core_spec, NULL);
    if (!LoopCore_Type) return -1;
    if (PyModule_AddIntConstant(module, "LOOP_POLL_TURNS", LOOP_POLL_TURNS) < 0 ||
        PyModule_AddIntConstant(module, "LOOP_POLL_NS", LOOP_POLL_NS) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "LoopCore", (PyObject *)LoopCore_Type);
}
