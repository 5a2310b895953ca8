/* doorbell.h — the thread behind asynchronous delivery (aem.start()).
 *
 * The doorbell thread never touches the engine's state: it waits (poll, no
 * GIL) until the engine's epoll fd has something ready *without consuming
 * it*, rings (a callback: the bindings schedule one pending call and
 * pthread_kill the main thread), then sleeps until the main thread has
 * drained the engine and acknowledged.  All engine state is thus handled by
 * the main thread alone.  While the main thread dispatches by itself
 * (aem.run / aem.keepalive) the doorbell is paused.
 */
#ifndef AEM_DOORBELL_H
#define AEM_DOORBELL_H

#include <pthread.h>
#include <stdint.h>

typedef struct aem_doorbell {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int epfd;
    int stopfd;
    int stopping;
    int rung;            /* rang, main thread has not acknowledged yet */
    int paused;
    void (*ring)(void *arg);
    void *arg;
    uint64_t rings;
} aem_doorbell;

int aem_doorbell_start(aem_doorbell *d, int epfd, void (*ring)(void *), void *arg);
void aem_doorbell_stop(aem_doorbell *d);       /* joins the thread */
void aem_doorbell_ack(aem_doorbell *d);        /* main thread: drained */
void aem_doorbell_pause(aem_doorbell *d, int paused);

#endif
