/* timers.c — every timer of an engine in one min-heap behind one timerfd.
 *
 * A timer costs its registration (48 bytes) and one heap entry (16 bytes);
 * there is no fd per timer, so their number is bounded by memory only.
 * The heap (heap.h) is ordered by (deadline, start order): timers due at the same
 * instant fire in the order they were started.  A registration's `link`
 * holds its heap index so removal is O(log n).
 *
 * The timerfd is armed (absolute CLOCK_MONOTONIC) for the earliest deadline
 * only when that deadline moves earlier; a removed earliest timer leaves the
 * timerfd armed, which costs one spurious wake-up at most.
 */
#define _GNU_SOURCE
#include "engine.h"
#include "heap.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/timerfd.h>

void aem__enqueue_timer(aem_engine *e, uint32_t slot, int64_t now, uint64_t count);

static inline int before(const aem_tentry *x, const aem_tentry *y) {
    if (x->deadline != y->deadline) return x->deadline < y->deadline;
    return (int32_t)(x->order - y->order) < 0;
}

/* A timer's registration keeps its heap index (for removal). */
#define TIMER_PLACED(ctx, i, t) (aem_slot((aem_engine *)(ctx), (t)->slot)->link = (i))

AEM_HEAP_DEFINE(theap, aem_tentry, before, TIMER_PLACED)

int aem_timers_insert(aem_engine *e, uint32_t slot, int64_t deadline) {
    if (theap_grow(&e->theap, &e->tcap, e->tlen) < 0) return -ENOMEM;
    aem_tentry t = {.deadline = deadline, .slot = slot, .order = e->torder++};
    theap_sift_up(e, e->theap, e->tlen++, t);
    return 0;
}

void aem_timers_remove(aem_engine *e, uint32_t slot) {
    uint32_t i = aem_slot(e, slot)->link;
    if (i >= e->tlen || e->theap[i].slot != slot) return;
    theap_remove_at(e, e->theap, &e->tlen, i);
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
            theap_sift_down(e, e->theap, e->tlen, 0, top);  /* the root moves later: push it down */
        } else {
            theap_remove_at(e, e->theap, &e->tlen, 0);
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
