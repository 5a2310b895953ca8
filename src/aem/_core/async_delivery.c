/* async_delivery.c — aem.start(): delivery that interrupts the main thread (see pyengine.h).
 *
 * The doorbell thread (doorbell.c) waits; when something is ready it schedules one pending
 * call and pthread_kills the main thread with the kick signal, whose Python-level handler also
 * drains: a busy main thread takes the pending call at its next bytecode boundary, a blocked
 * one returns from its syscall with EINTR and runs the signal handler before retrying (PEP 475).
 */
#define _GNU_SOURCE
#include "pyengine.h"
#include "vmtable_py.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <structmember.h>
#include <sys/un.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>


/* The engine in asynchronous mode (one per process: the kick signal is process-wide). */
static EngineObject *async_engine;
static int kick_signum;

#define AEM_DRAIN_TURNS 64  /* turns of one asynchronous drain (then the doorbell again) */

void aem_py_direct_kick(EngineObject *self, int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return;
    if (on) {
        struct f_owner_ex owner = {.type = F_OWNER_TID, .pid = self->main_tid};
        if (fcntl(fd, F_SETOWN_EX, &owner) < 0 || fcntl(fd, F_SETSIG, kick_signum) < 0) return;
        fcntl(fd, F_SETFL, fl | O_ASYNC);
    } else if (fl & O_ASYNC) {
        fcntl(fd, F_SETFL, fl & ~O_ASYNC);
    }
}

static void direct_kick_all(EngineObject *self, int on) {
    for (uint32_t fd = 0; fd < self->core.fdcap; fd++)
        if (self->core.fds[fd].events) aem_py_direct_kick(self, (int)fd, on);
}

void aem_py_stop_async(EngineObject *self, int in_child) {
    if (!self->async_on) return;
    self->async_on = 0;
    if (!in_child) direct_kick_all(self, 0);
    if (!in_child) {
        Py_BEGIN_ALLOW_THREADS
        aem_doorbell_stop(&self->doorbell);
        Py_END_ALLOW_THREADS
    }
    if (async_engine == self) {
        async_engine = NULL;
        if (!in_child) Py_DECREF(self);
    }
}


/* Deliver everything ready, in the main thread (pending call or kick signal handler). */
static int drain(EngineObject *self) {
    if (self->delivering || self->in_step || self->running || self->closed) {
        /* Not now (a handler or a turn is in progress: handlers never nest).  Whoever
         * is delivering acknowledges the doorbell when it is done. */
        self->nested++;
        self->ring_owed = 1;
        return 0;
    }
    self->drains++;
    int rc = 0;
    for (int i = 0; i < AEM_DRAIN_TURNS; i++) {
        int n = aem_py_engine_step(self, 0);
        if (n < 0) {
            rc = -1;
            break;
        }
        if (n == 0 && self->core.pqlen == 0) break;
    }
    /* Occurrences still queued (the budget ran out, or a BaseException stopped us):
     * make the epoll fd readable so that the doorbell rings again. */
    if (self->core.pqlen) aem_engine_wake(&self->core);
    self->ring_owed = 0;
    if (self->async_on) aem_doorbell_ack(&self->doorbell);
    return rc;
}

/* After a delivery outside any drain or turn (a synchronous _deliver_now): a ring
 * that came meanwhile was declined; acknowledge it now so the doorbell rings again. */
void aem_py_settle_owed_ring(EngineObject *self) {
    if (self->ring_owed && !self->delivering && !self->in_step && !self->running && self->async_on) {
        self->ring_owed = 0;
        aem_doorbell_ack(&self->doorbell);
    }
}

static int pending_drain(void *unused) {
    EngineObject *self = async_engine;
    if (!self) return 0;
    Py_INCREF(self);  /* a handler may stop() and drop the last reference */
    int rc = drain(self);
    Py_DECREF(self);
    return rc;
}

static void ring(void *arg) {
    EngineObject *self = arg;
    Py_AddPendingCall(pending_drain, NULL);  /* a full queue is fine: the signal drains too */
    pthread_kill(self->main_thread, kick_signum);
}

PyObject *aem_py_engine_start(EngineObject *self, PyObject *args) {
    int signum;
    if (!PyArg_ParseTuple(args, "i:_start_async", &signum)) return NULL;
    if (aem_py_check_open(self) < 0) return NULL;
    if (self->async_on) Py_RETURN_NONE;
    if (async_engine && async_engine != self) {
        PyErr_SetString(AemError, "another aem engine already delivers asynchronously in this process");
        return NULL;
    }
    self->main_thread = pthread_self();
    self->main_tid = (pid_t)syscall(SYS_gettid);
    kick_signum = signum;
    int rc = aem_doorbell_start(&self->doorbell, self->core.epfd, self->core.wakefd, ring,
                                aem_engine_event_is_fragile, self);
    if (rc < 0) return aem_py_errno_error(rc, "pthread_create");
    self->async_on = 1;
    direct_kick_all(self, 1);
    async_engine = self;
    Py_INCREF(self);
    Py_RETURN_NONE;
}

PyObject *aem_py_engine_drain(EngineObject *self, PyObject *noargs) {
    if (drain(self) < 0) return NULL;
    Py_RETURN_NONE;
}

/* The Python-level handler of the kick signal: _kick(signum, frame). */
PyObject *aem_kick(PyObject *module, PyObject *args) {
    if (pending_drain(NULL) < 0) return NULL;
    Py_RETURN_NONE;
}
