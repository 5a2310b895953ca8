/* engine.c — registrations, epoll interest, the pending queue and collection.
 *
 * Some facts about epoll this file relies on:
 * - One epoll registration per (fd, epoll fd): several aem registrations on one
 *   fd (Read + Close on a socket) share it; their interests are OR-ed and the
 *   fd's list of registrations is walked on readiness (aem_fdent).
 * - EPOLLHUP and EPOLLERR are reported even when not asked for, so an fd whose
 *   combined interest becomes 0 is removed from the epoll set (EPOLL_CTL_DEL).
 * - epoll forgets an fd when its last file reference is closed: a user who
 *   closes an fd without unregistering leaves a stale list behind; a later
 *   EPOLL_CTL_MOD on that number fails with ENOENT and is retried as ADD.
 * - Regular files cannot be watched (EPERM): they are always ready.
 * - epoll_wait is level-triggered here: an event not consumed is reported
 *   again, so every occurrence collected in one wait is delivered before the
 *   next wait (the host's step loop guarantees it).
 */
#define _GNU_SOURCE
#include "engine.h"
#include "heap.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* epoll data: tag in the top byte. */
#define TAG_SHIFT 56
#define TAG_FD 1ull       /* low bits: fd */
#define TAG_TIMER 2ull
#define TAG_WAKE 3ull
#define TAG_SIGNAL 4ull
#define TAG_INOTIFY 5ull
#define TAG_REG 6ull      /* low bits: (gen & 0xffffff) << 32 | slot */
#define TAG_LOW_MASK ((1ull << TAG_SHIFT) - 1)

#define ALWAYS_REPORTED (EPOLLHUP | EPOLLERR)

int64_t aem_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int epoll_add(int epfd, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {.events = events, .data.u64 = data};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

/* ---- lifetime -------------------------------------------------------------- */

int aem_engine_init(aem_engine *e, const aem_host *host) {
    memset(e, 0, sizeof *e);
    e->epfd = e->timerfd = e->wakefd = e->inotifyfd = -1;
    e->sigpipe[0] = e->sigpipe[1] = -1;
    e->host = *host;
    int err = 0;
    e->evbuf = calloc(AEM_MAXEVENTS, sizeof(struct epoll_event));
    if (!e->evbuf) return -ENOMEM;
    if ((e->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) goto fail;
    if ((e->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) < 0) goto fail;
    if ((e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) goto fail;
    if ((err = epoll_add(e->epfd, e->timerfd, EPOLLIN, TAG_TIMER << TAG_SHIFT)) < 0) goto fail_err;
    if ((err = epoll_add(e->epfd, e->wakefd, EPOLLIN, TAG_WAKE << TAG_SHIFT)) < 0) goto fail_err;
    return 0;
fail:
    err = -errno;
fail_err:
    aem_engine_destroy(e);
    return err;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

void aem_engine_destroy(aem_engine *e) {
    /* Owned per-registration fds (pidfd, PSI) and routed signals. */
    for (uint32_t s = 0; s < e->nslots; s++) {
        aem_reg *r = aem_slot(e, s);
        if (r->state == AEM_S_FREE) continue;
        if ((r->kind == AEM_K_CHILD || r->kind == AEM_K_PRESSURE) && r->fd >= 0) close(r->fd);
    }
    for (int sig = 1; sig < NSIG; sig++)
        if (e->sig_head[sig] && e->sigpipe[1] >= 0 && aem_signal_routed_fd(sig) == e->sigpipe[1])
            aem_signal_unroute(sig);
    close_fd(&e->epfd);
    close_fd(&e->timerfd);
    close_fd(&e->wakefd);
    close_fd(&e->inotifyfd);
    close_fd(&e->sigpipe[0]);
    close_fd(&e->sigpipe[1]);
    for (uint32_t c = 0; c < e->nchunks; c++) free(e->chunks[c]);
    free(e->chunks);
    free(e->fds);
    free(e->theap);
    for (uint32_t i = 0; i < e->pqlen; i++)
        if (e->pq[i].obj && e->host.release) e->host.release(e->pq[i].obj);
    for (uint32_t i = 0; i < e->nheld; i++)
        if (e->held[i].obj && e->host.release) e->host.release(e->held[i].obj);
    free(e->pq);
    free(e->held);
    free(e->wd_head);
    free(e->evbuf);
    memset(e, 0, sizeof *e);
    e->epfd = e->timerfd = e->wakefd = e->inotifyfd = -1;
    e->sigpipe[0] = e->sigpipe[1] = -1;
}

/* ---- the registration table ------------------------------------------------- */

aem_reg *aem_engine_lookup(const aem_engine *e, uint64_t eid, uint32_t *slot_out) {
    uint64_t low = eid & 0xffffffffu;
    if (low == 0 || low > e->nslots) return NULL;
    uint32_t slot = (uint32_t)(low - 1);
    aem_reg *r = aem_slot(e, slot);
    if (r->state == AEM_S_FREE || r->gen != (uint32_t)(eid >> 32)) return NULL;
    if (slot_out) *slot_out = slot;
    return r;
}

int64_t aem_engine_new_reg(aem_engine *e, uint8_t kind, uint16_t flags, int32_t priority,
                           void *handler, void *obj) {
    uint32_t slot;
    if (e->free_head) {
        slot = e->free_head - 1;
        e->free_head = aem_slot(e, slot)->link;
    } else {
        if (e->nslots == UINT32_MAX - 1) return -ENOMEM;
        if ((e->nslots >> AEM_CHUNK_SHIFT) >= e->nchunks) {
            aem_reg **chunks = realloc(e->chunks, sizeof(*chunks) * (e->nchunks + 1));
            if (!chunks) return -ENOMEM;
            e->chunks = chunks;
            chunks[e->nchunks] = calloc(AEM_CHUNK_SIZE, sizeof(aem_reg));
            if (!chunks[e->nchunks]) return -ENOMEM;
            e->nchunks++;
        }
        slot = e->nslots++;
    }
    aem_reg *r = aem_slot(e, slot);
    uint32_t gen = r->gen;
    memset(r, 0, sizeof *r);
    r->gen = gen;
    r->kind = kind;
    r->state = AEM_S_ACTIVE;
    r->flags = flags;
    r->priority = priority;
    r->fd = -1;
    r->handler = handler;
    r->obj = obj;
    e->live++;
    e->stats.registered[kind]++;
    e->stats.total_registered++;
    return slot;
}

/* ---- fds ----------------------------------------------------------------------- */

static int fd_reserve(aem_engine *e, int fd) {
    if ((uint32_t)fd < e->fdcap) return 0;
    uint32_t cap = e->fdcap ? e->fdcap : 64;
    while (cap <= (uint32_t)fd) cap *= 2;
    aem_fdent *fds = realloc(e->fds, sizeof(*fds) * cap);
    if (!fds) return -ENOMEM;
    memset(fds + e->fdcap, 0, sizeof(*fds) * (cap - e->fdcap));
    e->fds = fds;
    e->fdcap = cap;
    return 0;
}

/* Interest a registration adds to its fd. */
static uint32_t reg_interest(const aem_reg *r) {
    if (r->state != AEM_S_ACTIVE) return 0;
    return (uint32_t)r->arg;  /* low 32 bits: the epoll mask */
}

/* Bring epoll in line with the fd's registrations.  `force`: tell epoll even when
 * nothing seems to change (a new registration: the fd number may be a new file whose
 * predecessor, closed without unregistering, epoll has already forgotten). */
static int fd_sync_ex(aem_engine *e, int fd, int force) {
    aem_fdent *ent = &e->fds[fd];
    uint32_t want = 0;
    for (uint32_t s = ent->head; s; s = aem_slot(e, s - 1)->link) want |= reg_interest(aem_slot(e, s - 1));
    if (want == ent->events && !(force && want)) return 0;
    struct epoll_event ev = {.events = want, .data.u64 = (TAG_FD << TAG_SHIFT) | (uint64_t)fd};
    int rc = 0;
    if (want == 0) {
        if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, &ev) < 0 && errno != ENOENT && errno != EBADF) rc = -errno;
    } else if (ent->events == 0) {
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            rc = -errno;
            if (errno == EEXIST && epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev) == 0) rc = 0;
        }
    } else if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
        rc = -errno;
        if (errno == ENOENT && epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) == 0) rc = 0;
    }
    if (rc == 0) ent->events = want;
    return rc;
}

static int fd_sync(aem_engine *e, int fd) { return fd_sync_ex(e, fd, 0); }

int aem_engine_owns_fd(const aem_engine *e, int fd) {
    return fd >= 0 && (fd == e->epfd || fd == e->timerfd || fd == e->wakefd || fd == e->inotifyfd ||
                       fd == e->sigpipe[0] || fd == e->sigpipe[1]);
}

int aem_engine_arm_fd(aem_engine *e, uint32_t slot, int fd, uint32_t epoll_events) {
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) return -EBADF;
    int rc = fd_reserve(e, fd);
    if (rc < 0) return rc;
    aem_reg *r = aem_slot(e, slot);
    r->fd = fd;
    r->arg = (r->arg & ~(int64_t)0xffffffff) | epoll_events;  /* high bits: kind data */
    r->link = e->fds[fd].head;
    e->fds[fd].head = slot + 1;
    rc = fd_sync_ex(e, fd, 1);
    if (rc < 0) {  /* unlink again */
        e->fds[fd].head = r->link;
        r->fd = -1;
        r->link = 0;
        fd_sync(e, fd);
    }
    return rc;
}

static void fd_unlink(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    int fd = r->fd;
    if (fd < 0 || (uint32_t)fd >= e->fdcap) return;
    uint32_t *p = &e->fds[fd].head;
    while (*p && *p != slot + 1) p = &aem_slot(e, *p - 1)->link;
    if (*p) *p = r->link;
    r->link = 0;
    r->state = AEM_S_DONE;  /* so fd_sync no longer counts it */
    fd_sync(e, fd);
}

static uint64_t reg_tag(uint32_t slot, uint32_t gen) {
    return (TAG_REG << TAG_SHIFT) | ((uint64_t)(gen & 0xffffffu) << 32) | slot;
}

int aem_engine_arm_owned_fd(aem_engine *e, uint32_t slot, int fd, uint32_t epoll_events) {
    aem_reg *r = aem_slot(e, slot);
    int rc = epoll_add(e->epfd, fd, epoll_events, reg_tag(slot, r->gen));
    if (rc < 0) return rc;
    r->fd = fd;
    r->arg = (r->arg & ~(int64_t)0xffffffff) | epoll_events;
    return 0;
}

/* ---- signals ------------------------------------------------------------------- */

int aem_engine_arm_signal(aem_engine *e, uint32_t slot, int signum) {
    if (signum <= 0 || signum >= NSIG) return -EINVAL;
    if (e->sigpipe[0] < 0) {
        if (pipe2(e->sigpipe, O_NONBLOCK | O_CLOEXEC) < 0) return -errno;
        int rc = epoll_add(e->epfd, e->sigpipe[0], EPOLLIN, TAG_SIGNAL << TAG_SHIFT);
        if (rc < 0) {
            close_fd(&e->sigpipe[0]);
            close_fd(&e->sigpipe[1]);
            return rc;
        }
    }
    if (!e->sig_head[signum]) {
        int rc = aem_signal_route(signum, e->sigpipe[1]);
        if (rc < 0) return rc;
    }
    aem_reg *r = aem_slot(e, slot);
    r->fd = signum;
    r->link = e->sig_head[signum];
    e->sig_head[signum] = slot + 1;
    return 0;
}

static void signal_unlink(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    int sig = r->fd;
    if (sig <= 0 || sig >= NSIG) return;
    uint32_t *p = &e->sig_head[sig];
    while (*p && *p != slot + 1) p = &aem_slot(e, *p - 1)->link;
    if (*p) *p = r->link;
    r->link = 0;
    if (!e->sig_head[sig]) aem_signal_unroute(sig);
}

/* ---- inotify -------------------------------------------------------------------- */

int aem_engine_arm_inotify(aem_engine *e, uint32_t slot, const char *path, uint32_t mask) {
    if (e->inotifyfd < 0) {
        int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (fd < 0) return -errno;
        int rc = epoll_add(e->epfd, fd, EPOLLIN, TAG_INOTIFY << TAG_SHIFT);
        if (rc < 0) {
            close(fd);
            return rc;
        }
        e->inotifyfd = fd;
    }
    int wd = inotify_add_watch(e->inotifyfd, path, mask | IN_MASK_ADD);
    if (wd < 0) return -errno;
    if ((uint32_t)wd >= e->wdcap) {
        uint32_t cap = e->wdcap ? e->wdcap : 16;
        while (cap <= (uint32_t)wd) cap *= 2;
        uint32_t *h = realloc(e->wd_head, sizeof(*h) * cap);
        if (!h) {
            if (!(wd < (int)e->wdcap && e->wd_head[wd])) inotify_rm_watch(e->inotifyfd, wd);
            return -ENOMEM;
        }
        memset(h + e->wdcap, 0, sizeof(*h) * (cap - e->wdcap));
        e->wd_head = h;
        e->wdcap = cap;
    }
    aem_reg *r = aem_slot(e, slot);
    r->fd = wd;
    r->arg = mask;
    r->link = e->wd_head[wd];
    e->wd_head[wd] = slot + 1;
    return 0;
}

static void inotify_unlink(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    int wd = r->fd;
    if (wd < 0 || (uint32_t)wd >= e->wdcap) return;
    uint32_t *p = &e->wd_head[wd];
    while (*p && *p != slot + 1) p = &aem_slot(e, *p - 1)->link;
    if (*p) *p = r->link;
    r->link = 0;
    if (!e->wd_head[wd] && e->inotifyfd >= 0) inotify_rm_watch(e->inotifyfd, wd);
}

int aem_engine_arm_hosted(aem_engine *e, uint32_t slot) {
    (void)e;
    (void)slot;
    return 0;
}

int aem_engine_arm_timer(aem_engine *e, uint32_t slot, int64_t deadline, int64_t arg) {
    aem_reg *r = aem_slot(e, slot);
    r->arg = arg;
    int rc = aem_timers_insert(e, slot, deadline);
    if (rc < 0) return rc;
    aem_timers_rearm(e, 0);
    return 0;
}

/* ---- held occurrences (EVJOBSTOP) -------------------------------------------- */

static void hold(aem_engine *e, aem_reg *r, const aem_occ *o) {
    if (r->kind == AEM_K_TIMER) {  /* timers coalesce: one occurrence, counts added */
        for (uint32_t i = e->nheld; i-- > 0;) {
            if (e->held[i].slot == o->slot && e->held[i].gen == o->gen) {
                e->held[i].a += o->a;
                return;
            }
        }
    }
    if (r->held >= AEM_HELD_MAX) goto drop;
    if (e->nheld == e->heldcap) {
        uint32_t cap = e->heldcap ? e->heldcap * 2 : 16;
        aem_occ *h = realloc(e->held, sizeof(*h) * cap);
        if (!h) goto drop;
        e->held = h;
        e->heldcap = cap;
    }
    e->held[e->nheld++] = *o;
    r->held++;
    return;
drop:
    e->stats.dropped++;
    if (o->obj && e->host.release) e->host.release(o->obj);
}

static void unhold(aem_engine *e, uint32_t slot, int requeue) {
    aem_reg *r = aem_slot(e, slot);
    uint32_t j = 0;
    for (uint32_t i = 0; i < e->nheld; i++) {
        aem_occ *o = &e->held[i];
        if (o->slot == slot && o->gen == r->gen) {
            if (requeue) {
                o->priority = r->priority;
                if (aem_pq_push(e, o) == 0) continue;
                e->stats.dropped++;
            }
            if (o->obj && e->host.release) e->host.release(o->obj);
            continue;
        }
        e->held[j++] = *o;
    }
    e->nheld = j;
    r->held = 0;
}

/* ---- removal and job control ----------------------------------------------------- */

static int is_fd_kind(uint8_t kind) {
    return kind == AEM_K_READABLE || kind == AEM_K_WRITABLE || kind == AEM_K_ACCEPT ||
           kind == AEM_K_READ || kind == AEM_K_CLOSE || kind == AEM_K_CUSTOM;
}

void aem_engine_disarm(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    if (r->state == AEM_S_DONE || r->state == AEM_S_FREE) return;
    uint8_t prev = r->state;
    r->state = AEM_S_DONE;
    if (is_fd_kind(r->kind)) {
        if (r->fd >= 0 && (uint32_t)r->fd < e->fdcap) fd_sync(e, r->fd);
    } else if (r->kind == AEM_K_TIMER) {
        aem_timers_remove(e, slot);
    } else if ((r->kind == AEM_K_CHILD || r->kind == AEM_K_PRESSURE) && r->fd >= 0 && prev == AEM_S_ACTIVE) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, r->fd, NULL);
    }
}

void aem_engine_free_reg(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    if (r->state == AEM_S_FREE) return;
    switch (r->kind) {
    case AEM_K_TIMER:
        if (r->state != AEM_S_DONE) aem_timers_remove(e, slot);
        break;
    case AEM_K_SIGNAL:
        signal_unlink(e, slot);
        break;
    case AEM_K_FILE:
        inotify_unlink(e, slot);
        break;
    case AEM_K_CHILD:
    case AEM_K_PRESSURE:
        if (r->fd >= 0) close(r->fd);  /* closing removes it from epoll */
        break;
    default:
        if (is_fd_kind(r->kind)) fd_unlink(e, slot);
        break;
    }
    if (r->held) unhold(e, slot, 0);
    e->stats.registered[r->kind]--;
    e->live--;
    r->state = AEM_S_FREE;
    r->gen++;
    r->handler = r->obj = NULL;
    r->kind = AEM_K_NONE;
    r->fd = -1;
    r->link = e->free_head;
    e->free_head = slot + 1;
    /* Pending occurrences of this slot are dropped lazily by aem_engine_pop (gen differs). */
}

int aem_engine_stop_reg(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    if (r->state != AEM_S_ACTIVE) return r->state == AEM_S_STOPPED ? 0 : -EINVAL;
    r->state = AEM_S_STOPPED;
    if (is_fd_kind(r->kind) && r->fd >= 0) return fd_sync(e, r->fd);
    if ((r->kind == AEM_K_CHILD || r->kind == AEM_K_PRESSURE) && r->fd >= 0) {
        /* Level-triggered: leave the kernel object armed but stop listening. */
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, r->fd, NULL);
    }
    return 0;
}

int aem_engine_start_reg(aem_engine *e, uint32_t slot) {
    aem_reg *r = aem_slot(e, slot);
    if (r->state != AEM_S_STOPPED) return r->state == AEM_S_ACTIVE ? 0 : -EINVAL;
    r->state = AEM_S_ACTIVE;
    int rc = 0;
    if (is_fd_kind(r->kind) && r->fd >= 0) rc = fd_sync(e, r->fd);
    else if ((r->kind == AEM_K_CHILD || r->kind == AEM_K_PRESSURE) && r->fd >= 0)
        rc = epoll_add(e->epfd, r->fd, (uint32_t)r->arg, reg_tag(slot, r->gen));
    if (r->held) unhold(e, slot, 1);
    return rc;
}

void aem_engine_set_priority(aem_engine *e, uint32_t slot, int32_t priority) {
    aem_slot(e, slot)->priority = priority;
}

/* ---- the pending queue: the binary heap of heap.h on (priority desc, seq asc) ------- */

static inline int occ_before(const aem_occ *x, const aem_occ *y) {
    if (x->priority != y->priority) return x->priority > y->priority;
    return x->seq < y->seq;
}

AEM_HEAP_DEFINE(pq, aem_occ, occ_before, AEM_HEAP_NOT_TRACKED)

int aem_pq_push(aem_engine *e, const aem_occ *o) {
    if (pq_grow(&e->pq, &e->pqcap, e->pqlen) < 0) return -ENOMEM;
    pq_sift_up(e, e->pq, e->pqlen++, *o);
    return 0;
}

static void pq_pop_top(aem_engine *e) { pq_remove_at(e, e->pq, &e->pqlen, 0); }

/* Queue an occurrence for a live registration (or hold it if stopped). */
static void enqueue(aem_engine *e, uint32_t slot, aem_reg *r, int64_t now, uint64_t a, uint64_t b,
                    void *obj) {
    aem_occ o = {.seq = ++e->seq, .time_ns = now, .a = a, .b = b, .obj = obj,
                 .slot = slot, .gen = r->gen, .priority = r->priority};
    e->stats.occurrences++;
    if (r->state == AEM_S_STOPPED) {
        hold(e, r, &o);
        return;
    }
    if (aem_pq_push(e, &o) < 0) {
        e->stats.dropped++;
        if (obj && e->host.release) e->host.release(obj);
    }
}

int aem_engine_pop(aem_engine *e, aem_occ *out) {
    while (e->pqlen) {
        *out = e->pq[0];
        pq_pop_top(e);
        aem_reg *r = aem_slot(e, out->slot);
        if (r->state == AEM_S_FREE || r->gen != out->gen) {  /* unregistered since */
            if (out->obj && e->host.release) e->host.release(out->obj);
            continue;
        }
        if (r->state == AEM_S_STOPPED) {  /* stopped since */
            hold(e, r, out);
            continue;
        }
        return 1;
    }
    return 0;
}

int aem_engine_push(aem_engine *e, uint64_t eid, uint64_t a, uint64_t b, void *obj) {
    uint32_t slot;
    aem_reg *r = aem_engine_lookup(e, eid, &slot);
    if (!r || r->state == AEM_S_DONE) {
        if (obj && e->host.release) e->host.release(obj);
        return -ENOENT;
    }
    enqueue(e, slot, r, aem_now_ns(), a, b, obj);
    return 0;
}

int aem_engine_event_is_fragile(uint64_t data) { return (data >> TAG_SHIFT) == TAG_REG; }

void aem_engine_wake(aem_engine *e) {
    if (e->wake_pending) return;
    e->wake_pending = 1;
    uint64_t one = 1;
    ssize_t rc = write(e->wakefd, &one, sizeof one);
    (void)rc;
}

/* ---- the wait and the collection ---------------------------------------------------- */

int aem_engine_wait(int epfd, void *evs, int maxevents, int timeout_ms) {
    int n = epoll_wait(epfd, (struct epoll_event *)evs, maxevents, timeout_ms);
    return n < 0 ? -errno : n;
}

static void collect_fd(aem_engine *e, int fd, uint32_t events, int64_t now) {
    if ((uint32_t)fd >= e->fdcap) return;
    for (uint32_t s = e->fds[fd].head; s;) {
        uint32_t slot = s - 1;
        aem_reg *r = aem_slot(e, slot);
        s = r->link;
        if (r->state != AEM_S_ACTIVE) continue;
        uint32_t match = events & ((uint32_t)r->arg | ALWAYS_REPORTED);
        if (!match) continue;
        if (r->kind == AEM_K_WRITABLE && !(events & (EPOLLOUT | ALWAYS_REPORTED))) continue;
        if (r->kind == AEM_K_CLOSE || (r->flags & AEM_F_ONESHOT)) {
            enqueue(e, slot, r, now, events, 0, NULL);
            aem_engine_disarm(e, slot);
            continue;
        }
        enqueue(e, slot, r, now, events, 0, NULL);
    }
}

static void collect_signals(aem_engine *e, int64_t now) {
    aem_sigrec recs[64];
    for (;;) {
        ssize_t n = read(e->sigpipe[0], recs, sizeof recs);
        if (n <= 0) break;
        for (size_t i = 0; i < (size_t)n / sizeof recs[0]; i++) {
            int sig = recs[i].signum;
            if (sig <= 0 || sig >= NSIG) continue;
            for (uint32_t s = e->sig_head[sig]; s;) {
                aem_reg *r = aem_slot(e, s - 1);
                uint32_t slot = s - 1;
                s = r->link;
                if (r->state == AEM_S_DONE) continue;
                uint64_t b = ((uint64_t)(uint32_t)recs[i].pid << 32) | recs[i].uid;
                enqueue(e, slot, r, now, (uint64_t)sig | ((uint64_t)(uint32_t)recs[i].code << 32), b, NULL);
                if ((r->flags & AEM_F_ONESHOT) && r->state == AEM_S_ACTIVE) r->state = AEM_S_DONE;
            }
        }
        if ((size_t)n < sizeof recs) break;
    }
}

static void collect_inotify(aem_engine *e, int64_t now) {
    char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t n = read(e->inotifyfd, buf, sizeof buf);
        if (n <= 0) break;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            p += sizeof *ev + ev->len;
            if (ev->wd == -1 && (ev->mask & IN_Q_OVERFLOW)) {
                /* The kernel's queue overflowed: changes were lost; every watch hears it. */
                for (uint32_t w = 0; w < e->wdcap; w++)
                    for (uint32_t s = e->wd_head[w]; s;) {
                        aem_reg *r = aem_slot(e, s - 1);
                        uint32_t slot = s - 1;
                        s = r->link;
                        if (r->state != AEM_S_DONE) enqueue(e, slot, r, now, IN_Q_OVERFLOW, 0, NULL);
                    }
                continue;
            }
            if (ev->wd < 0 || (uint32_t)ev->wd >= e->wdcap) continue;
            for (uint32_t s = e->wd_head[ev->wd]; s;) {
                aem_reg *r = aem_slot(e, s - 1);
                uint32_t slot = s - 1;
                s = r->link;
                if (r->state == AEM_S_DONE) continue;
                uint32_t always = IN_IGNORED | IN_Q_OVERFLOW | IN_UNMOUNT;
                if (!(ev->mask & ((uint32_t)r->arg | always))) continue;
                void *name = NULL;
                if (ev->len && e->host.make_name) name = e->host.make_name(ev->name, strnlen(ev->name, ev->len));
                enqueue(e, slot, r, now, ev->mask, ev->cookie, name);
                if ((r->flags & AEM_F_ONESHOT) && r->state == AEM_S_ACTIVE) r->state = AEM_S_DONE;
            }
        }
    }
}

static void collect_reg(aem_engine *e, uint64_t low, uint32_t events, int64_t now) {
    uint32_t slot = (uint32_t)low;
    if (slot >= e->nslots) return;
    aem_reg *r = aem_slot(e, slot);
    if (r->state != AEM_S_ACTIVE || (r->gen & 0xffffffu) != (uint32_t)(low >> 32)) return;
    enqueue(e, slot, r, now, events, 0, NULL);
    if (r->kind == AEM_K_CHILD || (r->flags & AEM_F_ONESHOT)) aem_engine_disarm(e, slot);
}

void aem_engine_collect(aem_engine *e, const void *evbuf, int n) {
    const struct epoll_event *evs = evbuf;
    int64_t now = aem_now_ns();
    e->stats.wakeups++;
    for (int i = 0; i < n; i++) {
        uint64_t data = evs[i].data.u64;
        uint64_t low = data & TAG_LOW_MASK;
        switch (data >> TAG_SHIFT) {
        case TAG_FD:
            collect_fd(e, (int)low, evs[i].events, now);
            break;
        case TAG_TIMER: {
            uint64_t ticks;
            ssize_t rc = read(e->timerfd, &ticks, sizeof ticks);
            (void)rc;
            e->armed = 0;
            aem_timers_collect(e, now);
            aem_timers_rearm(e, 1);
            break;
        }
        case TAG_WAKE: {
            uint64_t v;
            ssize_t rc = read(e->wakefd, &v, sizeof v);
            (void)rc;
            e->wake_pending = 0;
            break;
        }
        case TAG_SIGNAL:
            collect_signals(e, now);
            break;
        case TAG_INOTIFY:
            collect_inotify(e, now);
            break;
        case TAG_REG:
            collect_reg(e, low, evs[i].events, now);
            break;
        }
    }
}

/* Used by timers.c to queue an expiry. */
void aem__enqueue_timer(aem_engine *e, uint32_t slot, int64_t now, uint64_t count) {
    aem_reg *r = aem_slot(e, slot);
    enqueue(e, slot, r, now, count, 0, NULL);
}
