/* timers.c — every timer of an engine in one min-heap behind one timerfd.
 *
 * A timer costs its registration (48 bytes) and one heap entry (16 bytes);
 * there is no fd per timer, so their number is bounded by memory only.
 * The heap is ordered by (deadline, start order): timers due at the same
 * instant fire in the order they were started.  A registration's `link`
 * holds its heap index so removal is O(log n).
 *
 * The timerfd is armed (absolute CLOCK_MONOTONIC) for the earliest deadline
 * only when that deadline moves earlier; a removed earliest timer leaves the
 * timerfd armed, which costs one spurious wake-up at most.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/timerfd.h>

void aem__enqueue_timer(aem_engine *e, uint32_t slot, int64_t now, uint64_t count);

static inline int before(const aem_tentry *x, const aem_tentry *y) {
    if (x->deadline != y->deadline) return x->deadline < y->deadline;
    return (int32_t)(x->order - y->order) < 0;
}

static inline void place(aem_engine *e, uint32_t i, const aem_tentry *t) {
    e->theap[i] = *t;
    aem_slot(e, t->slot)->link = i;
}

static void sift_up(aem_engine *e, uint32_t i, aem_tentry t) {
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!before(&t, &e->theap[parent])) break;
        place(e, i, &e->theap[parent]);
        i = parent;
    }
    place(e, i, &t);
}

static void sift_down(aem_engine *e, uint32_t i, aem_tentry t) {
    uint32_t n = e->tlen;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && before(&e->theap[c + 1], &e->theap[c])) c++;
        if (!before(&e->theap[c], &t)) break;
        place(e, i, &e->theap[c]);
        i = c;
    }
    place(e, i, &t);
}

int aem_timers_insert(aem_engine *e, uint32_t slot, int64_t deadline) {
    if (e->tlen == e->tcap) {
        uint32_t cap = e->tcap ? e->tcap * 2 : 64;
        aem_tentry *h = realloc(e->theap, sizeof(*h) * cap);
        if (!h) return -ENOMEM;
        e->theap = h;
        e->tcap = cap;
    }
    aem_tentry t = {.deadline = deadline, .slot = slot, .order = e->torder++};
    sift_up(e, e->tlen++, t);
    return 0;
}

void aem_timers_remove(aem_engine *e, uint32_t slot) {
    uint32_t i = aem_slot(e, slot)->link;
    if (i >= e->tlen || e->theap[i].slot != slot) return;
    aem_tentry last = e->theap[--e->tlen];
    if (i == e->tlen) return;
    if (i > 0 && before(&last, &e->theap[(i - 1) / 2])) sift_up(e, i, last);
    else sift_down(e, i, last);
}

int64_t aem_timers_deadline(const aem_engine *e, uint32_t slot) {
    uint32_t i = aem_slot(e, slot)->link;
    if (i >= e->tlen || e->theap[i].slot != slot) return -1;
    return e->theap[i].deadline;
}

void aem_timers_collect(aem_engine *e, int64_t now) {
    while (e->tlen && e->theap[0].deadline <= now) {
        aem_tentry top = e->theap[0];
        aem_reg *r = aem_slot(e, top.slot);
        int64_t interval = (r->flags & AEM_F_PERIODIC) ? r->arg : 0;
        uint64_t count = 1;
        if (interval > 0) {
            uint64_t late = (uint64_t)(now - top.deadline);
            count = late / (uint64_t)interval + 1;
            top.deadline += (int64_t)count * interval;
            top.order = e->torder++;
            sift_down(e, 0, top);  /* the root moves later: push it down */
        } else {
            aem_tentry last = e->theap[--e->tlen];
            if (e->tlen) sift_down(e, 0, last);
            r->state = r->state == AEM_S_STOPPED ? AEM_S_STOPPED : AEM_S_DONE;
            r->link = UINT32_MAX;
        }
        if (r->flags & AEM_F_ONESHOT && interval > 0) {
            aem_timers_remove(e, top.slot);
            r->link = UINT32_MAX;
            if (r->state == AEM_S_ACTIVE) r->state = AEM_S_DONE;
        }
        aem__enqueue_timer(e, top.slot, now, count);
    }
}

void aem_timers_rearm(aem_engine *e, int force) {
    int64_t want = e->tlen ? e->theap[0].deadline : 0;
    if (want <= 0) want = e->tlen ? 1 : 0;
    if (!force && e->armed && want >= e->armed) return;
    if (!force && !e->tlen) return;
    struct itimerspec its = {0};
    its.it_value.tv_sec = want / 1000000000;
    its.it_value.tv_nsec = want % 1000000000;
    timerfd_settime(e->timerfd, TFD_TIMER_ABSTIME, &its, NULL);
    e->armed = want;
}
