"""Fast requests beside a slow handler, both p99s from one run (``aem bench apps``' p99 cases).

A load client in C (:data:`LOAD_C`, compiled here like the floor server of
:mod:`aem.bench.http`) keeps ``conns`` keep-alive connections asking ``/hello``
one request after another (reconnecting when the server closes, as gunicorn's
sync workers do) and, in a thread of its own, asks ``/slow`` (100 ms) again and
again, a new connection each, in the first half of every second and not in the
second half.  It records when each request started and how long it took
(from its write to the end of its answer, as wrk times it).

A fast request that overlaps a stretch of slow requests (from the first one's
connect to the last one's answer, plus :data:`MARGIN`) is *beside* the slow
handler; one that starts more than :data:`MARGIN` after such a stretch and ends
before the next begins is *alone*.  The two p99s come from the same run,
interleaved every half second: the machine's drift from one run to the next
(on this VM the p50 of the same server moved by up to 1.8x between two 4 s runs
in a row) does not enter their ratio, which it did when the two were separate
wrk runs (per-round ratios of 0.49 to 4.67 in one full run, session 17).

The floor (:data:`SLEEP_C`): the same client with its slow requests sent to a
minimal C server (accept, read, sleep 100 ms, write, close) on the server's CPU
while its fast requests go to aem: what the ratio reads when the slow requests
cost the server under test nothing, only the kernel's work for their
connections, the slow client's CPU and a process waking on the server's CPU.
"""

from __future__ import annotations

import array
import bisect
import os
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._harness import compile_c

#: How long after a slow request's answer a fast request still counts as beside it (ns).
MARGIN = 5_000_000
#: Slow requests closer together than this form one stretch (ns).
GAP = 20_000_000
#: The slow client's period: slow requests in its first half (ms).
PERIOD_MS = 1000

LOAD_C = r"""
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* load PORT FAST_PATH CONNS SECONDS SLOW_PORT SLOW_PATH PERIOD_MS SLOW_CPU OUT
 * CONNS threads, a keep-alive connection each, GET FAST_PATH one after another; with
 * SLOW_PORT > 0 a thread GETs SLOW_PATH (a new connection each) in the first half of
 * every PERIOD_MS, on CPU SLOW_CPU (-1: any CPU).  OUT: int64 n_fast, n_slow, then
 * n_fast (start, latency) and n_slow (start, end) pairs, CLOCK_MONOTONIC ns. */

typedef struct { long long *rec; size_t n, cap; } log_t;

static int port, slow_port, slow_cpu;
static const char *fast_path, *slow_path;
static long long t_end, period;

static long long now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int add(log_t *l, long long a, long long b) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 65536;
        long long *p = realloc(l->rec, cap * 2 * sizeof *p);
        if (!p) return -1;
        l->rec = p;
        l->cap = cap;
    }
    l->rec[2 * l->n] = a;
    l->rec[2 * l->n + 1] = b;
    l->n++;
    return 0;
}

static int dial(int p) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)p),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (s < 0) return -1;
    if (connect(s, (struct sockaddr *)&a, sizeof a)) {
        close(s);
        return -1;
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
}

/* Read one answer (Content-Length framed) from s into buf, keeping what follows it;
 * returns 1 if the server closes after it, 0 if not, -1 on error. */
static int answer(int s, char *buf, size_t size, size_t *got) {
    size_t head = 0, len = 0;
    int closing = 0, have_head = 0;
    for (;;) {
        if (!have_head) {
            char *end = strstr(buf, "\r\n\r\n");
            if (end) {
                head = (size_t)(end + 4 - buf);
                *end = 0;
                char *cl = strcasestr(buf, "\ncontent-length:");
                closing = strcasestr(buf, "\nconnection: close") != NULL;
                *end = '\r';
                len = cl ? strtoul(cl + 16, NULL, 10) : 0;
                have_head = 1;
            }
        }
        if (have_head && *got >= head + len) break;
        if (*got >= size - 1) return -1;
        ssize_t n = read(s, buf + *got, size - 1 - *got);
        if (n <= 0) return -1;
        *got += (size_t)n;
        buf[*got] = 0;
    }
    size_t used = head + len;
    memmove(buf, buf + used, *got - used);
    *got -= used;
    buf[*got] = 0;
    return closing;
}

static void *fast(void *arg) {
    log_t *l = arg;
    char req[512];
    static __thread char buf[65536];
    buf[0] = 0;
    int rl = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", fast_path);
    int s = dial(port);
    size_t got = 0;
    while (s >= 0 && now() < t_end) {
        long long t0 = now();
        if (write(s, req, (size_t)rl) != rl) break;
        int r = answer(s, buf, sizeof buf, &got);
        if (r < 0) break;
        if (add(l, t0, now() - t0) < 0) break;
        if (r == 1) {  /* the server closes: connect again before the next request */
            close(s);
            s = dial(port);
            got = 0;
            buf[0] = 0;
        }
    }
    if (s >= 0) close(s);
    return NULL;
}

static void *slow(void *arg) {
    log_t *l = arg;
    if (slow_cpu >= 0) {
        cpu_set_t c;
        CPU_ZERO(&c);
        CPU_SET(slow_cpu, &c);
        sched_setaffinity(0, sizeof c, &c);
    } else {
        cpu_set_t c;
        CPU_ZERO(&c);
        for (long i = 0; i < sysconf(_SC_NPROCESSORS_ONLN) && i < CPU_SETSIZE; i++) CPU_SET(i, &c);
        sched_setaffinity(0, sizeof c, &c);
    }
    char req[512], buf[65536];
    int rl = snprintf(req, sizeof req,
                      "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", slow_path);
    long long base = now();
    while (now() < t_end) {
        long long in = (now() - base) % period;
        if (in >= period / 2) {
            struct timespec ts = {(period - in) / 1000000000LL, (period - in) % 1000000000LL};
            nanosleep(&ts, NULL);
            continue;
        }
        long long t0 = now();
        int s = dial(slow_port);
        if (s < 0) {
            usleep(10000);
            continue;
        }
        if (write(s, req, (size_t)rl) == rl)
            while (read(s, buf, sizeof buf) > 0) {}
        close(s);
        if (add(l, t0, now()) < 0) break;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: load PORT FAST_PATH CONNS SECONDS SLOW_PORT SLOW_PATH "
                        "PERIOD_MS SLOW_CPU OUT\n");
        return 2;
    }
    port = atoi(argv[1]);
    fast_path = argv[2];
    int conns = atoi(argv[3]);
    double secs = atof(argv[4]);
    slow_port = atoi(argv[5]);
    slow_path = argv[6];
    period = atoll(argv[7]) * 1000000LL;
    slow_cpu = atoi(argv[8]);
    if (conns < 1 || conns > 64 || period <= 0) return 2;
    t_end = now() + (long long)(secs * 1e9);
    pthread_t th[65];
    static log_t logs[65];
    for (int i = 0; i < conns; i++) pthread_create(&th[i], NULL, fast, &logs[i]);
    if (slow_port > 0) pthread_create(&th[64], NULL, slow, &logs[64]);
    for (int i = 0; i < conns; i++) pthread_join(th[i], NULL);
    if (slow_port > 0) pthread_join(th[64], NULL);
    FILE *f = fopen(argv[9], "wb");
    if (!f) return 1;
    long long nf = 0, ns = (long long)logs[64].n;
    for (int i = 0; i < conns; i++) nf += (long long)logs[i].n;
    fwrite(&nf, 8, 1, f);
    fwrite(&ns, 8, 1, f);
    for (int i = 0; i < conns; i++) fwrite(logs[i].rec, 16, logs[i].n, f);
    fwrite(logs[64].rec, 16, logs[64].n, f);
    return fclose(f) ? 1 : 0;
}
"""

SLEEP_C = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* sleep-server PORT: answers each connection after 100 ms, one at a time, then closes it. */
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 64)) return 1;
    static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nslept";
    char buf[4096];
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        if (read(c, buf, sizeof buf) > 0) {
            struct timespec ts = {0, 100000000};
            nanosleep(&ts, NULL);
            if (write(c, answer, sizeof answer - 1) < 0) {}
        }
        close(c);
    }
}
"""


def binaries(tmp: Path) -> tuple[str, str] | None:
    """The load client and the sleep server, compiled with the C compiler here (None without one)."""
    load = compile_c(tmp, "slowmix-load", LOAD_C, "-pthread")
    sleep = compile_c(tmp, "slowmix-sleep", SLEEP_C)
    return (load, sleep) if load and sleep else None


@dataclass
class Mix:
    """One run: the fast requests' p99 alone and beside the slow handler, and their counts."""

    p99_alone_us: float
    p99_beside_us: float
    alone: int
    beside: int
    slow: int

    @property
    def ratio(self) -> float:
        return self.p99_beside_us / self.p99_alone_us


def _p99(values: list[int]) -> float:
    return statistics.quantiles(values, n=100)[98] / 1e3 if len(values) >= 100 else float("nan")


def split(fast: list[tuple[int, int]], slow: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The latencies of the fast requests ``(start, latency)`` alone and beside the slow ones
    ``(start, end)`` (see the module doc); a fast request near a stretch's edge but not
    overlapping it (within ``MARGIN`` after its end) is in neither."""
    stretches: list[list[int]] = []
    for s, e in sorted(slow):
        if stretches and s - stretches[-1][1] < GAP:
            stretches[-1][1] = max(stretches[-1][1], e)
        else:
            stretches.append([s, e])
    starts = [s for s, _ in stretches]
    alone: list[int] = []
    beside: list[int] = []
    for t, lat in fast:
        i = bisect.bisect_right(starts, t + lat) - 1     # the last stretch begun before it ended
        if i >= 0 and t <= stretches[i][1] + MARGIN:
            beside.append(lat)
        elif i < 0 or t > stretches[i][1] + MARGIN:
            alone.append(lat)
    return alone, beside


def run_mix(load: str, port: int, slow_port: int, conns: int, seconds: float, client_cpu: int,
            slow_cpu: int, out: Path) -> Mix:
    """One run of the load client (on ``client_cpu``; its slow thread on ``slow_cpu``, -1: any)."""
    argv = [load, str(port), "/hello", str(conns), str(seconds), str(slow_port), "/slow",
            str(PERIOD_MS), str(slow_cpu), str(out)]
    if (os.cpu_count() or 1) > client_cpu:
        argv = ["taskset", "-c", str(client_cpu), *argv]
    subprocess.run(argv, check=True, timeout=seconds + 60, capture_output=True)
    a = array.array("q")
    a.frombytes(out.read_bytes())
    nf, ns = a[0], a[1]
    fast = [(a[2 + 2 * i], a[3 + 2 * i]) for i in range(nf)]
    base = 2 + 2 * nf
    slow = [(a[base + 2 * i], a[base + 2 * i + 1]) for i in range(ns)]
    alone, beside = split(fast, slow)
    return Mix(_p99(alone), _p99(beside), len(alone), len(beside), ns)
