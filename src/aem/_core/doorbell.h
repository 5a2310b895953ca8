/* doorbell.h — the thread behind asynchronous delivery (aem.start()).
 *
 * The doorbell thread never touches the engine's state: it waits in
 * epoll_wait on the engine's epoll fd (no GIL), rings (a callback: the
 * bindings schedule one pending call and pthread_kill the main thread), then
 * sleeps until the main thread has drained the engine and acknowledged.  All
 * engine state is thus handled by the main thread alone.  While the main
 * thread dispatches by itself (aem.run / aem.keepalive) the doorbell is paused.
 *
 * Most sources are level-triggered: what the doorbell's epoll_wait reports is
 * reported again to the main thread's own epoll_wait.  A few are consumed by
 * being polled (a PSI trigger reports each event once): those events the
 * doorbell keeps (`fragile` says which) and hands over (aem_doorbell_take).
 */
#ifndef AEM_DOORBELL_H
#define AEM_DOORBELL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/epoll.h>

#define AEM_DOORBELL_HANDOVER 64

typedef struct aem_doorbell {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int epfd;
    int wakefd;          /* written to interrupt the thread's epoll_wait */
    int stopping;
    int rung;            /* rang, main thread has not acknowledged yet */
    int paused;
    void (*ring)(void *arg);
    int (*fragile)(uint64_t data);
    void *arg;
    uint64_t rings;
    struct epoll_event handover[AEM_DOORBELL_HANDOVER];
    int nhandover;
} aem_doorbell;

int aem_doorbell_start(aem_doorbell *d, int epfd, int wakefd, void (*ring)(void *),
                       int (*fragile)(uint64_t), void *arg);
void aem_doorbell_stop(aem_doorbell *d);       /* joins the thread */
void aem_doorbell_ack(aem_doorbell *d);        /* main thread: drained */
void aem_doorbell_pause(aem_doorbell *d, int paused);
/* Take the events handed over (at most max); returns how many. */
int aem_doorbell_take(aem_doorbell *d, struct epoll_event *out, int max);

#endif
