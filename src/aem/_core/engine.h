/* engine.h — the event engine of aem, in plain C (no Python here).
 *
 * Where an event travels:
 *
 *   kernel object ready ──► epoll (one per engine) ──► aem_engine_collect()
 *        timerfd ─► due timers popped from the timers' heap (timers.c)
 *        signal pipe ─► records written by the process-wide handler (signals.c)
 *        inotify fd ─► one occurrence per matching watch
 *        fd ─► every registration on that fd whose interest matches
 *        wake eventfd ─► occurrences pushed by aem_engine_push() from any thread
 *   ──► pending queue: a binary heap ordered by (priority desc, arrival seq asc)
 *       (both heaps are the one of heap.h)
 *   ──► aem_engine_pop() hands occurrences, in order, to the host (the Python
 *       bindings), which builds the event and runs the handler.
 *
 * The engine never calls the host except through the few hooks of aem_host
 * (releasing an occurrence's object, making an object of a file name).
 * Everything here is called with one lock held by the caller (the GIL in
 * aem): the engine has no locks of its own except in the async doorbell.
 *
 * Identifiers: a registration lives in a slot of a chunked table (pointers to
 * slots stay valid while the table grows).  Its id ("eid") is
 * (generation << 32) | (slot + 1): positive, never 0, and never reused while
 * the slot's generation has not wrapped (2^32 reuses of one slot).
 *
 * Errors: functions return 0 (or a positive value) on success and a negative
 * errno on failure, as libuv does.
 */
#ifndef AEM_ENGINE_H
#define AEM_ENGINE_H

#include <stdint.h>
#include <stddef.h>
#include <signal.h>

/* ---- public constants (mirrored in Python) --------------------------------- */

enum aem_kind {
    AEM_K_NONE = 0,
    AEM_K_TIMER,
    AEM_K_READABLE,
    AEM_K_WRITABLE,
    AEM_K_ACCEPT,
    AEM_K_READ,
    AEM_K_CLOSE,
    AEM_K_SIGNAL,
    AEM_K_CHILD,       /* one pid, through a pidfd */
    AEM_K_JOB,         /* any process created by a registration (host-fed) */
    AEM_K_FILE,
    AEM_K_USER,
    AEM_K_PRESSURE,
    AEM_K_CUSTOM,      /* user-defined source on an fd */
    AEM_K_HOSTED,      /* occurrences pushed only by the host (e.g. vmtable shortage) */
    AEM_K__COUNT
};

/* Flags of a registration (values are the public EVF_* constants). */
#define AEM_F_ONESHOT   0x01u
#define AEM_F_FORK      0x02u
#define AEM_F_NOCLDWAIT 0x04u
#define AEM_F_CAPSULE   0x08u
#define AEM_F_KEEPALIVE 0x10u
#define AEM_F__PUBLIC   0x1fu
#define AEM_F_EXTRAS    0x100u  /* internal: obj holds the host's extras record */
#define AEM_F_PERIODIC  0x400u  /* internal: a timer with an interval (arg is the interval) */
#define AEM_F_NOREAP    0x800u  /* internal: ChildExit(reap=False) */

/* Job operations (aem_evctl numbering of the original). */
#define AEM_EVJOBPRIO  1
#define AEM_EVTBLINIT  2
#define AEM_EVJOBSHTDN 3
#define AEM_EVJOBSTART 4
#define AEM_EVJOBSTOP  5

/* Occurrences kept for a stopped registration; more are dropped (counted). */
#define AEM_HELD_MAX 1024u

enum aem_state { AEM_S_FREE = 0, AEM_S_ACTIVE, AEM_S_STOPPED, AEM_S_DONE };

/* ---- data ------------------------------------------------------------------ */

typedef struct aem_reg {
    uint32_t gen;        /* generation of the slot */
    uint8_t kind;        /* enum aem_kind */
    uint8_t state;       /* enum aem_state */
    uint16_t flags;      /* AEM_F_* */
    int32_t priority;
    uint32_t link;       /* fd list: next slot+1; timer: heap index; free list: next slot+1 */
    int32_t fd;          /* fd, signum, inotify wd, pidfd, ... (-1: none) */
    uint32_t held;       /* occurrences held while stopped */
    int64_t arg;         /* one-shot timer: `after` ns; periodic timer: interval ns;
                          * fd and owned-fd kinds: epoll mask (low 32 bits) | kind data << 32
                          * (Read: max size; ChildExit: pid); inotify: mask */
    void *handler;       /* owned by the host */
    void *obj;           /* owned by the host (source object or extras), may be NULL */
} aem_reg;

typedef struct aem_occ {
    uint64_t seq;        /* arrival order */
    int64_t time_ns;     /* CLOCK_MONOTONIC when the engine saw it */
    uint64_t a, b;       /* kind data: epoll mask / timer count / signum / inotify mask ... */
    void *obj;           /* kind data owned by the host (payload, name), or NULL */
    uint32_t slot, gen;
    int32_t priority;
    uint32_t _pad;
} aem_occ;

typedef struct aem_tentry {  /* one timer in the min-heap */
    int64_t deadline;
    uint32_t slot;
    uint32_t order;      /* start order: ties run in registration order */
} aem_tentry;

typedef struct aem_fdent {   /* registrations on one fd */
    uint32_t head;       /* first slot+1, 0 = none */
    uint32_t events;     /* interest currently set in epoll (0 = not added) */
} aem_fdent;

typedef struct aem_host {
    void (*release)(void *obj);                          /* drop an occurrence's obj */
    void *(*make_name)(const char *name, size_t len);    /* inotify name -> obj */
} aem_host;

typedef struct aem_stats {
    uint64_t registered[AEM_K__COUNT];  /* live, per kind */
    uint64_t delivered[AEM_K__COUNT];   /* counted by the host */
    uint64_t total_registered;          /* ever */
    uint64_t occurrences;               /* collected or pushed */
    uint64_t dropped;                   /* held beyond AEM_HELD_MAX, or lost */
    uint64_t errors;                    /* handler exceptions (host) */
    uint64_t wakeups;                   /* epoll_wait returns */
} aem_stats;

#define AEM_MAXEVENTS 256
#define AEM_CHUNK_SHIFT 14
#define AEM_CHUNK_SIZE (1u << AEM_CHUNK_SHIFT)

typedef struct aem_engine {
    int epfd;
    int timerfd;
    int wakefd;          /* eventfd: aem_engine_wake() and pushes from other threads */
    int inotifyfd;       /* -1 until the first FileChange */
    int sigpipe[2];      /* signal records from signals.c ({-1,-1} until the first Signal) */
    int wake_pending;
    void *evbuf;         /* struct epoll_event[AEM_MAXEVENTS] for the one waiting thread */

    aem_reg **chunks;
    uint32_t nchunks;
    uint32_t nslots;     /* slots ever handed out (high-water mark) */
    uint32_t free_head;  /* slot+1 of the first free slot, 0 = none */
    uint32_t live;       /* registrations alive */

    aem_fdent *fds;
    uint32_t fdcap;

    aem_tentry *theap;
    uint32_t tlen, tcap;
    uint32_t torder;
    int64_t armed;       /* deadline the timerfd is armed for (0 = disarmed) */

    aem_occ *pq;
    uint32_t pqlen, pqcap;
    uint64_t seq;

    aem_occ *held;
    uint32_t nheld, heldcap;

    uint32_t sig_head[NSIG];   /* slot+1 lists per signal */
    uint32_t *wd_head;         /* inotify watch -> slot+1 list */
    uint32_t wdcap;

    aem_host host;
    aem_stats stats;
} aem_engine;

/* ---- lifetime ---------------------------------------------------------------- */

int aem_engine_init(aem_engine *e, const aem_host *host);
/* Close the engine's fds and free its memory.  Registrations' handler/obj are
 * NOT released: the host walks them first (aem_engine_foreach). */
void aem_engine_destroy(aem_engine *e);

/* ---- registrations ------------------------------------------------------------ */

static inline aem_reg *aem_slot(const aem_engine *e, uint32_t slot) {
    return &e->chunks[slot >> AEM_CHUNK_SHIFT][slot & (AEM_CHUNK_SIZE - 1)];
}
static inline uint64_t aem_eid_of(uint32_t slot, uint32_t gen) {
    return ((uint64_t)gen << 32) | ((uint64_t)slot + 1);
}
/* The live registration of eid, or NULL. */
aem_reg *aem_engine_lookup(const aem_engine *e, uint64_t eid, uint32_t *slot_out);

/* Allocate a registration (state ACTIVE, not yet armed). Returns its slot or -ENOMEM. */
int64_t aem_engine_new_reg(aem_engine *e, uint8_t kind, uint16_t flags, int32_t priority,
                           void *handler, void *obj);
/* Arm a new registration by kind (call once, after aem_engine_new_reg). */
int aem_engine_arm_timer(aem_engine *e, uint32_t slot, int64_t deadline, int64_t arg);
/* 1 when fd is one of the engine's own descriptors (epoll, timerfd, eventfd, inotify, signal pipe). */
int aem_engine_owns_fd(const aem_engine *e, int fd);
int aem_engine_arm_fd(aem_engine *e, uint32_t slot, int fd, uint32_t epoll_events);
int aem_engine_arm_signal(aem_engine *e, uint32_t slot, int signum);
int aem_engine_arm_owned_fd(aem_engine *e, uint32_t slot, int fd, uint32_t epoll_events);
int aem_engine_arm_inotify(aem_engine *e, uint32_t slot, const char *path, uint32_t mask);
int aem_engine_arm_hosted(aem_engine *e, uint32_t slot);

/* Remove a registration: disarm, drop its pending and held occurrences.
 * The caller releases handler/obj (read them before). */
void aem_engine_free_reg(aem_engine *e, uint32_t slot);

/* EVJOBSTOP / EVJOBSTART / EVJOBPRIO. */
int aem_engine_stop_reg(aem_engine *e, uint32_t slot);
int aem_engine_start_reg(aem_engine *e, uint32_t slot);
void aem_engine_set_priority(aem_engine *e, uint32_t slot, int32_t priority);
/* A registration is done: no further occurrences are collected (fd interest
 * dropped, timer removed); the host unregisters it after delivery. */
void aem_engine_disarm(aem_engine *e, uint32_t slot);

/* ---- the loop ------------------------------------------------------------------ */

/* Wait (no lock needed: touches only the epoll fd and evs). timeout_ms < 0: forever.
 * Returns the number of events, or -errno (-EINTR when a signal arrived). */
int aem_engine_wait(int epfd, void *evs, int maxevents, int timeout_ms);
/* Turn n epoll events into pending occurrences. */
void aem_engine_collect(aem_engine *e, const void *evs, int n);
/* Push an occurrence for a registration (host-made events: user events, job exits).
 * Takes ownership of obj.  Returns 0 or -ENOENT (registration gone; obj released). */
int aem_engine_push(aem_engine *e, uint64_t eid, uint64_t a, uint64_t b, void *obj);
/* Pop the next pending occurrence in delivery order. Returns 0 when empty. */
int aem_engine_pop(aem_engine *e, aem_occ *out);
/* Wake a wait in progress (from any thread). */
void aem_engine_wake(aem_engine *e);
/* An epoll event that polling consumes (a PSI trigger): it must not be lost when
 * another thread's wait sees it first (the async doorbell). */
int aem_engine_event_is_fragile(uint64_t data);

int64_t aem_now_ns(void);

/* ---- timers (timers.c) ---------------------------------------------------------- */
int aem_timers_insert(aem_engine *e, uint32_t slot, int64_t deadline);
void aem_timers_remove(aem_engine *e, uint32_t slot);
/* Pop every timer due at `now` into the pending queue. */
void aem_timers_collect(aem_engine *e, int64_t now);
/* Arm the timerfd for the earliest deadline if it moved earlier (or re-arm with force). */
void aem_timers_rearm(aem_engine *e, int force);
int64_t aem_timers_deadline(const aem_engine *e, uint32_t slot);

/* ---- pending queue (engine.c) --------------------------------------------------- */
int aem_pq_push(aem_engine *e, const aem_occ *o);

/* ---- process-wide signal routing (signals.c) ------------------------------------ */
/* Route signum to the write end `wfd` (records of struct aem_sigrec).  The
 * previous disposition is saved and restored by aem_signal_unroute. */
int aem_signal_route(int signum, int wfd);
void aem_signal_unroute(int signum);
int aem_signal_routed_fd(int signum);
/* After fork in the child: restore every routed signal's previous disposition. */
void aem_signal_reset_in_child(void);

typedef struct aem_sigrec {
    int32_t signum;
    int32_t pid;
    uint32_t uid;
    int32_t code;
} aem_sigrec;

#endif
