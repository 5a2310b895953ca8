/* loop.h — shared by the parts of aem.EventLoop's C core: loop.c (handles, queues, the turn),
 * loop_fd.c (wakers, reads), loop_stream.c (the stream transport's I/O). */
#ifndef AEM_LOOP_H
#define AEM_LOOP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "pyaem.h"

/* Offsets of asyncio.Handle / asyncio.TimerHandle slots (same for every loop). */
extern Py_ssize_t off_callback, off_args, off_cancelled, off_loop, off_source_tb, off_repr, off_context,
    off_scheduled, off_when;

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* asyncio.Handle objects kept for reuse (loop.c, recycle) */
#define LOOP_SPARE_HANDLES 64

typedef struct {
    double when;
    uint64_t seq;
    PyObject *handle;   /* a TimerHandle (owned) */
} tent;

typedef struct {
    PyObject_HEAD
    PyObject *loop;           /* the aem.EventLoop (the handles' _loop) */
    Py_ssize_t off_stopping;  /* where its _stopping slot is in it, or -1 (getattr) */
    Py_ssize_t off_debug;     /* where its _debug slot is, or -1 (getattr) */
    PyObject *future_type;    /* asyncio.futures.Future (create_future) */
    PyTypeObject *handle_type, *timer_type;
    PyObject *select;         /* selector.select */
    PyObject *process_events; /* loop._process_events */
    PyObject *report;         /* loop._aem_report(handle, exc) */
    PyObject *run_debug;      /* loop._aem_run_debug(handle) */
    EngineObject *engine;     /* fast path: the engine turn itself instead of select() (or NULL) */
    PyObject *fd_to_key;      /* the selector's fd -> SelectorKey (with engine) */
    PyObject *remove_fd[2];   /* loop._remove_reader, loop._remove_writer (with engine) */
    PyObject **to_flush;      /* what wrote during this turn: to_flush[flush_head:nflush] (owned) */
    Py_ssize_t flush_head, nflush, flushcap;
    PyObject **ring;          /* ready handles: ring[(head + i) % cap], i < len; cap a power of 2 */
    Py_ssize_t head, len, cap;
    tent *heap;
    uint32_t hlen, hcap;  /* the timer heap (heap.h) */
    uint64_t seq;
    Py_ssize_t cancelled;     /* cancelled timers still in the heap */
    double clock_resolution;
    double last_poll;         /* when the last turn polled for I/O (CLOCK_MONOTONIC, s) */
    int skipped;              /* turns in a row that skipped the poll (callbacks were ready) */
    uint64_t turns;           /* turns run so far (a transport counts its writes per turn) */
    PyObject *spare[LOOP_SPARE_HANDLES]; /* ran handles nothing else referred to, slots cleared (loop.c) */
    int nspare;
    int closed, debug;
    int in_turn;              /* the loop's own engine turn is delivering (wakers queue handles) */
    uint64_t *parked;         /* eids of wakers' registrations parked outside a turn (loop_fd.c) */
    Py_ssize_t nparked, parkcap;
} LoopCoreObject;

/* Bounded poll skipping (loop.c, one_turn): with callbacks ready, poll for I/O at least every
 * LOOP_POLL_TURNS turns and on the first turn starting LOOP_POLL_NS or more after the last poll. */
#ifndef LOOP_POLL_TURNS
#define LOOP_POLL_TURNS 32
#endif
#ifndef LOOP_POLL_NS
#define LOOP_POLL_NS 100000
#endif

static inline int is_cancelled(PyObject *h) { return SLOT(h, off_cancelled) == Py_True; }

/* loop.c: queue a ready handle (takes the reference). Returns 0 or -1. */
int aem_loop_ring_push(LoopCoreObject *self, PyObject *h);
/* loop.c: queue obj to be flushed at the end of this loop turn. Returns 0 or -1. */
int aem_loop_flush_later(PyObject *core, PyObject *obj);

/* loop_fd.c */
int aem_loop_waker_init_type(PyObject *module);
PyObject *aem_loop_waker(LoopCoreObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *aem_loop_recv(PyObject *const *args, Py_ssize_t nargs);
PyObject *aem_loop_accept(PyObject *const *args, Py_ssize_t nargs);
/* One read of fd (at most max bytes; guess: the size expected, 0 if small): a bytes object of
 * exactly what came (b"" at EOF), or NULL with an exception set, or NULL with *err = the errno of
 * a failed read (no exception set). */
PyObject *aem_loop_read(int fd, size_t max, size_t guess, int *err);
/* One read of fd appended to the bytearray buf (no exports): the bytes added (> 0), 0 at EOF, or -1:
 * *err = the errno of a failed read (no exception set), or an exception set.  On EOF and errors buf is
 * left as it was. */
Py_ssize_t aem_loop_read_append(int fd, PyObject *buf, size_t guess, int *err);
void aem_loop_unpark(LoopCoreObject *self); /* before a poll: re-arm what wakers parked */

/* http_fast.c: the offset of a plain __slots__ attribute of tp, or -1 */
Py_ssize_t aem_slot_offset(PyTypeObject *tp, PyObject *name);

/* loop_stream.c */
int aem_stream_init_type(PyObject *module);
int aem_stream_check(PyObject *obj);       /* obj is a StreamIO */
int aem_stream_flush(PyObject *io);        /* end of turn: send what was written; 0 or -1 */
PyObject *aem_stream_new(PyObject *core, PyObject *transport, int fd);

/* loop_feed.c: StreamReaderProtocol.data_received in C.  aem_feed_begin: 1 if proto's next read can go
 * straight into its StreamReader's buffer (st holds the reader's state), 0 if it takes the Python call
 * (st empty, nothing changed).  After the read is in st->buffer, aem_feed_end wakes the reader (0, or -1
 * with data_received's exception set); aem_feed_release drops st without it (EOF, a failed read). */
typedef struct {
    PyObject *reader, *buffer, *waiter, *transport, *paused, *limit;
} aem_feed;
int aem_feed_init(void);
void aem_feed_prepare(void);
int aem_feed_begin(PyObject *proto, aem_feed *st);
int aem_feed_end(aem_feed *st);
void aem_feed_release(aem_feed *st);
unsigned long long aem_feed_count(void); /* reads fed in C so far */

#endif
