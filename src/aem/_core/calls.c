/* calls.c — the executor's answers, parent side (CapsulePool.submit / result()).
 *
 *   call_recv(sockfd) -> None | (data, fds)
 *       One message from a worker's non-blocking socket without waiting: None when
 *       there is none yet (no exception on the common path), (b"", []) at the end of
 *       the stream, else the message's bytes and the fds that came with it.
 *   wait_readable(fd, timeout_ms, spin_us=0, bell=-1) -> bool
 *       poll() one fd for input, the GIL released; True when readable (or at its
 *       end or on an error: the next call_recv says which), False on timeout.
 *       With spin_us, it first polls without sleeping (sched_yield() between two
 *       polls: a worker on this CPU runs meanwhile) for up to spin_us µs.  With
 *       bell (an eventfd), it also returns (True) when the bell is readable: another
 *       thread completed the call the caller waits for.
 *
 * Any thread may call them (the buffer is the call's own).  Errors: OSError.
 */
#include "handoff.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CALL_BUF (AEM_HO_MAX_DATA + 16 * 1024) /* a message above 60 KiB travels in a memfd */
#define CALL_FDS_MAX 16

static PyObject *call_recv(PyObject *mod, PyObject *arg) {
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return NULL;
    }
    int sockfd = (int)v;
    char *buf = PyMem_RawMalloc(CALL_BUF);
    if (!buf) return PyErr_NoMemory();
    union {
        char buf[CMSG_SPACE(CALL_FDS_MAX * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {buf, CALL_BUF};
    struct msghdr msg;
    ssize_t n;
    do {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        n = recvmsg(sockfd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        int err = errno;
        PyMem_RawFree(buf);
        if (err == EAGAIN || err == EWOULDBLOCK) Py_RETURN_NONE;
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int fds[CALL_FDS_MAX];
    int nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k && nfds < CALL_FDS_MAX; i++)
            memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    PyObject *list = NULL, *data = NULL;
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        PyErr_SetString(PyExc_ValueError, "truncated message from a capsule");
        goto fail;
    }
    list = PyList_New(nfds);
    if (!list) goto fail;
    for (int i = 0; i < nfds; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (!v) goto fail;
        PyList_SET_ITEM(list, i, v);
    }
    data = PyBytes_FromStringAndSize(buf, n);
    if (!data) goto fail;
    PyMem_RawFree(buf);
    return Py_BuildValue("(NN)", data, list);
fail:
    Py_XDECREF(list);
    PyMem_RawFree(buf);
    for (int i = 0; i < nfds; i++) close(fds[i]);
    return NULL;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int aem_spin_readable(int fd, int spin_us) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int64_t end = now_ns() + (int64_t)spin_us * 1000;
    int n;
    do {
        n = poll(&p, 1, 0);
        if (n != 0) return n;
        sched_yield();
    } while (now_ns() < end);
    return 0;
}

static PyObject *wait_readable(PyObject *mod, PyObject *args) {
    int fd, timeout_ms, spin_us = 0, bell = -1;
    if (!PyArg_ParseTuple(args, "ii|ii:wait_readable", &fd, &timeout_ms, &spin_us, &bell)) return NULL;
    struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = bell, .events = POLLIN}};
    int n = 0;
    Py_BEGIN_ALLOW_THREADS
    if (spin_us > 0) n = aem_spin_readable(fd, spin_us);
    if (n == 0) n = poll(p, bell >= 0 ? 2 : 1, timeout_ms);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        if (errno == EINTR) {  /* a signal: its handler runs, the caller waits again */
            if (PyErr_CheckSignals() < 0) return NULL;
            Py_RETURN_FALSE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(n > 0);
}

static PyMethodDef call_methods[] = {
    {"call_recv", call_recv, METH_O,
     "call_recv(sockfd) -> None | (data, fds)\n\nOne message from a non-blocking socket, without "
     "waiting: None if there is none yet, (b\"\", []) at its end."},
    {"wait_readable", wait_readable, METH_VARARGS,
     "wait_readable(fd, timeout_ms, spin_us=0, bell=-1) -> bool\n\npoll() fd (and bell) for input, "
     "the GIL released, after spin_us µs of polls without sleeping: True if readable."},
    {NULL},
};

int aem_calls_init(PyObject *module) {
    return PyModule_AddFunctions(module, call_methods);
}
