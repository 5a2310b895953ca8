/* doorbell.c — see doorbell.h. */
#define _GNU_SOURCE
#include "doorbell.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void *doorbell_main(void *arg) {
    aem_doorbell *d = arg;
    struct epoll_event evs[AEM_DOORBELL_HANDOVER];
    for (;;) {
        pthread_mutex_lock(&d->lock);
        while ((d->rung || d->paused) && !d->stopping) pthread_cond_wait(&d->cond, &d->lock);
        int stopping = d->stopping;
        pthread_mutex_unlock(&d->lock);
        if (stopping) break;
        int n = epoll_wait(d->epfd, evs, AEM_DOORBELL_HANDOVER, -1);
        if (n < 0 && errno != EINTR) break;
        pthread_mutex_lock(&d->lock);
        if (d->stopping) {
            pthread_mutex_unlock(&d->lock);
            break;
        }
        for (int i = 0; i < n; i++)
            if (d->fragile(evs[i].data.u64) && d->nhandover < AEM_DOORBELL_HANDOVER)
                d->handover[d->nhandover++] = evs[i];
        int ring = n > 0 && !d->paused && !d->rung;
        if (ring) {
            d->rung = 1;
            d->rings++;
        }
        pthread_mutex_unlock(&d->lock);
        if (ring) d->ring(d->arg);
    }
    return NULL;
}

int aem_doorbell_start(aem_doorbell *d, int epfd, int wakefd, void (*ring)(void *),
                       int (*fragile)(uint64_t), void *arg) {
    memset(d, 0, sizeof *d);
    d->epfd = epfd;
    d->wakefd = wakefd;
    d->ring = ring;
    d->fragile = fragile;
    d->arg = arg;
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->cond, NULL);
    /* The thread must not take the process's signals (the kick signal in particular). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&d->thread, NULL, doorbell_main, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_mutex_destroy(&d->lock);
        pthread_cond_destroy(&d->cond);
        return -rc;
    }
    return 0;
}

void aem_doorbell_stop(aem_doorbell *d) {
    pthread_mutex_lock(&d->lock);
    d->stopping = 1;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    uint64_t one = 1;  /* out of epoll_wait (the engine reads this wake-up later) */
    ssize_t rc = write(d->wakefd, &one, sizeof one);
    (void)rc;
    pthread_join(d->thread, NULL);
    pthread_mutex_destroy(&d->lock);
    pthread_cond_destroy(&d->cond);
}

void aem_doorbell_ack(aem_doorbell *d) {
    pthread_mutex_lock(&d->lock);
    d->rung = 0;
    pthread_cond_signal(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

void aem_doorbell_pause(aem_doorbell *d, int paused) {
    pthread_mutex_lock(&d->lock);
    d->paused = paused;
    if (!paused) d->rung = 0;
    pthread_cond_signal(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

int aem_doorbell_take(aem_doorbell *d, struct epoll_event *out, int max) {
    pthread_mutex_lock(&d->lock);
    int n = d->nhandover < max ? d->nhandover : max;
    memcpy(out, d->handover, sizeof(*out) * (size_t)n);
    memmove(d->handover, d->handover + n, sizeof(*out) * (size_t)(d->nhandover - n));
    d->nhandover -= n;
    pthread_mutex_unlock(&d->lock);
    return n;
}
