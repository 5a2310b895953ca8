/* doorbell.c — see doorbell.h. */
#define _GNU_SOURCE
#include "doorbell.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void *doorbell_main(void *arg) {
    aem_doorbell *d = arg;
    struct pollfd pfd[2] = {{.fd = d->epfd, .events = POLLIN}, {.fd = d->stopfd, .events = POLLIN}};
    for (;;) {
        pthread_mutex_lock(&d->lock);
        while ((d->rung || d->paused) && !d->stopping) pthread_cond_wait(&d->cond, &d->lock);
        int stopping = d->stopping;
        pthread_mutex_unlock(&d->lock);
        if (stopping) break;
        int n = poll(pfd, 2, -1);
        if (n < 0 && errno != EINTR) break;
        if (pfd[1].revents) break;
        if (n <= 0 || !pfd[0].revents) continue;
        pthread_mutex_lock(&d->lock);
        int ring = !d->paused && !d->stopping && !d->rung;
        if (ring) {
            d->rung = 1;
            d->rings++;
        }
        pthread_mutex_unlock(&d->lock);
        if (ring) d->ring(d->arg);
    }
    return NULL;
}

int aem_doorbell_start(aem_doorbell *d, int epfd, void (*ring)(void *), void *arg) {
    memset(d, 0, sizeof *d);
    d->epfd = epfd;
    d->ring = ring;
    d->arg = arg;
    d->stopfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->stopfd < 0) return -errno;
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->cond, NULL);
    /* The thread must not take the process's signals (the kick signal in particular). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&d->thread, NULL, doorbell_main, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        close(d->stopfd);
        d->stopfd = -1;
        return -rc;
    }
    return 0;
}

void aem_doorbell_stop(aem_doorbell *d) {
    pthread_mutex_lock(&d->lock);
    d->stopping = 1;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    uint64_t one = 1;
    ssize_t rc = write(d->stopfd, &one, sizeof one);
    (void)rc;
    pthread_join(d->thread, NULL);
    close(d->stopfd);
    d->stopfd = -1;
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
