/* signals.c — process-wide routing of signals to an engine's pipe.
 *
 * A routed signal gets a SA_SIGINFO handler that writes one aem_sigrec
 * (signum, sender pid and uid, si_code) into the owning engine's pipe: write()
 * is async-signal-safe, the pipe is non-blocking (a full pipe drops the record:
 * signals coalesce anyway), and the handler runs in whatever thread the kernel
 * picked, so no signal mask has to be set in every thread (which signalfd
 * would need).  The disposition in force before is saved and restored when the
 * last registration of that signal goes, and in a forked child straight after
 * fork (pthread_atfork), so a child never writes into its parent's pipe.
 *
 * This takes the signal's disposition over while registered, as asyncio's
 * add_signal_handler does; Python's signal.getsignal() does not see it.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t routed_fd[NSIG];  /* write end + 1; 0 = not routed */
static struct sigaction saved[NSIG];
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_signal(int signum, siginfo_t *info, void *uctx) {
    (void)uctx;
    int saved_errno = errno;
    int fd = (signum > 0 && signum < NSIG) ? (int)routed_fd[signum] - 1 : -1;
    if (fd >= 0) {
        aem_sigrec rec = {.signum = signum, .pid = -1, .uid = (uint32_t)-1, .code = 0};
        if (info) {
            rec.code = info->si_code;
            if (info->si_code == SI_USER || info->si_code == SI_QUEUE || info->si_code == SI_TKILL) {
                rec.pid = info->si_pid;
                rec.uid = info->si_uid;
            }
        }
        ssize_t rc = write(fd, &rec, sizeof rec);
        (void)rc;
    }
    errno = saved_errno;
}

static void atfork_child(void) { aem_signal_reset_in_child(); }

static void install_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

int aem_signal_route(int signum, int wfd) {
    if (signum <= 0 || signum >= NSIG) return -EINVAL;
    if (signum == SIGKILL || signum == SIGSTOP) return -EINVAL;
    if (routed_fd[signum]) return (int)routed_fd[signum] - 1 == wfd ? 0 : -EBUSY;
    pthread_once(&atfork_once, install_atfork);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigfillset(&sa.sa_mask);
    routed_fd[signum] = wfd + 1;
    if (sigaction(signum, &sa, &saved[signum]) < 0) {
        routed_fd[signum] = 0;
        return -errno;
    }
    return 0;
}

void aem_signal_unroute(int signum) {
    if (signum <= 0 || signum >= NSIG || !routed_fd[signum]) return;
    sigaction(signum, &saved[signum], NULL);
    routed_fd[signum] = 0;
}

int aem_signal_routed_fd(int signum) {
    if (signum <= 0 || signum >= NSIG) return -1;
    return (int)routed_fd[signum] - 1;
}

void aem_signal_reset_in_child(void) {
    for (int s = 1; s < NSIG; s++) aem_signal_unroute(s);
}
