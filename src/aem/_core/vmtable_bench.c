/* vmtable_bench.c — the C loops of `aem bench vmtable`: the allocator core (vmtable.c)
 * measured against glibc malloc on the same size streams, without Python in the loop.
 *
 *   _vmt_bench    ns per alloc+free pair (ping-pong, flood, random sizes)
 *   _vmt_latency  individually timed allocations in a pool filled to a fraction
 *   _vmt_frag     fragmentation at the first shortage of a random-size flood
 *
 * Measurement code only: nothing here is used by the engine or the VMTable binding.
 */
#define _GNU_SOURCE
#include "pyaem.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

#include "vmtable.h"

static inline uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Log-uniform sizes in [lo, hi): exponent uniform, then uniform within the octave. */
static inline uint64_t rng_size(uint64_t *s, uint64_t lo, uint64_t hi) {
    unsigned elo = 63u - (unsigned)__builtin_clzll(lo), ehi = 63u - (unsigned)__builtin_clzll(hi);
    if (ehi <= elo) return lo;
    unsigned e = elo + (unsigned)(rng_next(s) % (ehi - elo));
    uint64_t base = 1ull << e, v = base + rng_next(s) % base;
    return v < lo ? lo : v >= hi ? hi - 1 : v;
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Ticks of a fine counter (TSC, the virtual counter), converted with ns_per_tick(). */
static inline uint64_t ticks(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_lfence();
    uint64_t t = __rdtsc();
    _mm_lfence();
    return t;
#elif defined(__aarch64__)
    uint64_t t;
    __asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(t)::"memory");
    return t;
#else
    return (uint64_t)now_ns();
#endif
}

static double ns_per_tick(void) {
    int64_t n0 = now_ns();
    uint64_t t0 = ticks();
    struct timespec nap = {0, 20000000};
    nanosleep(&nap, NULL);
    int64_t n1 = now_ns();
    uint64_t t1 = ticks();
    return t1 > t0 ? (double)(n1 - n0) / (double)(t1 - t0) : 1.0;
}

typedef struct {
    aem_vmt *t;        /* NULL: glibc malloc */
    uint64_t *off;
    uint32_t *gen;
    void **ptr;
    long failures;
} bench_heap;

static inline int bh_alloc(bench_heap *h, size_t slot, uint64_t n) {
    if (h->t) {
        if (aem_vmt_alloc(h->t, n, &h->off[slot], &h->gen[slot]) < 0) {
            h->failures++;
            h->off[slot] = UINT64_MAX;
            return -1;
        }
        return 0;
    }
    h->ptr[slot] = malloc(n);
    if (!h->ptr[slot]) h->failures++;
    return h->ptr[slot] ? 0 : -1;
}

static inline void bh_free(bench_heap *h, size_t slot) {
    if (h->t) {
        if (h->off[slot] != UINT64_MAX) aem_vmt_free(h->t, h->off[slot], h->gen[slot]);
        h->off[slot] = UINT64_MAX;
    } else {
        free(h->ptr[slot]);
        h->ptr[slot] = NULL;
    }
}

/* _vmt_bench(pattern, allocator, count, size=4096, seed=1, zone=TBL_UZONE) -> ns per alloc+free pair
 *   "pingpong": alloc size, free it, count times
 *   "flood":    alloc 1024 blocks of size, free them in order, until count pairs
 *   "random":   1024 live blocks; count times free a random one and allocate a
 *               random size (log-uniform 64 B .. 64 KiB) in its place
 * allocator "aem" (the core on a fresh pool) or "malloc" (glibc), same size stream. */
static PyObject *py_vmt_bench(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pattern", "allocator", "count", "size", "seed", "zone", NULL};
    const char *pattern, *allocator;
    Py_ssize_t count, size = 4096;
    unsigned long long seed = 1;
    int zone = AEM_VMT_UZONE;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ssn|nKi:_vmt_bench", kwlist, &pattern, &allocator, &count,
                                     &size, &seed, &zone))
        return NULL;
    int random_sizes = !strcmp(pattern, "random"), flood = !strcmp(pattern, "flood");
    if (!random_sizes && !flood && strcmp(pattern, "pingpong")) {
        PyErr_Format(PyExc_ValueError, "unknown pattern %s (pingpong, flood, random)", pattern);
        return NULL;
    }
    int use_aem = !strcmp(allocator, "aem");
    if (!use_aem && strcmp(allocator, "malloc")) {
        PyErr_Format(PyExc_ValueError, "unknown allocator %s (aem, malloc)", allocator);
        return NULL;
    }
    if (count < 1 || size < 1 || size > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "count >= 1 and 1 <= size <= 16 MiB");
        return NULL;
    }
    enum { LIVE = 1024 };
    const uint64_t lo = 64, hi = 65536;
    uint64_t s = seed | 1;
    uint32_t *sizes = NULL, *slots = NULL;
    bench_heap h = {0};
    h.off = calloc(LIVE, sizeof *h.off);
    h.gen = calloc(LIVE, sizeof *h.gen);
    h.ptr = calloc(LIVE, sizeof *h.ptr);
    if (random_sizes) {
        sizes = malloc((size_t)count * sizeof *sizes);
        slots = malloc((size_t)count * sizeof *slots);
    }
    if (!h.off || !h.gen || !h.ptr || (random_sizes && (!sizes || !slots))) {
        PyErr_NoMemory();
        goto out;
    }
    for (size_t i = 0; i < LIVE; i++) h.off[i] = UINT64_MAX;
    uint64_t pool = random_sizes ? 256ull << 20 : flood ? 2ull * LIVE * (uint64_t)size : 64ull << 20;
    if (pool < (64ull << 20)) pool = 64ull << 20;
    if (use_aem) {
        aem_vmt_config cfg = {.size = pool, .min_block = 64, .zone = zone, .flags = AEM_VMT_F_LAZY};
        int rc = aem_vmt_create(&cfg, &h.t);
        if (rc < 0) {
            errno = -rc;
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    }
    double result = 0;
    Py_BEGIN_ALLOW_THREADS
    if (random_sizes) {
        for (Py_ssize_t i = 0; i < count; i++) {
            sizes[i] = (uint32_t)rng_size(&s, lo, hi);
            slots[i] = (uint32_t)(rng_next(&s) % LIVE);
        }
        for (size_t i = 0; i < LIVE; i++) bh_alloc(&h, i, rng_size(&s, lo, hi));
        int64_t t0 = now_ns();
        for (Py_ssize_t i = 0; i < count; i++) {
            bh_free(&h, slots[i]);
            bh_alloc(&h, slots[i], sizes[i]);
        }
        result = (double)(now_ns() - t0) / (double)count;
        for (size_t i = 0; i < LIVE; i++) bh_free(&h, i);
    } else if (flood) {
        Py_ssize_t done = 0;
        int64_t t0 = now_ns();
        while (done < count) {
            for (size_t i = 0; i < LIVE; i++) bh_alloc(&h, i, (uint64_t)size);
            for (size_t i = 0; i < LIVE; i++) bh_free(&h, i);
            done += LIVE;
        }
        result = (double)(now_ns() - t0) / (double)done;
    } else {
        int64_t t0 = now_ns();
        for (Py_ssize_t i = 0; i < count; i++) {
            bh_alloc(&h, 0, (uint64_t)size);
            bh_free(&h, 0);
        }
        result = (double)(now_ns() - t0) / (double)count;
    }
    Py_END_ALLOW_THREADS
    if (h.failures) {
        PyErr_Format(PyExc_RuntimeError, "%ld allocations failed during the benchmark", h.failures);
        goto out;
    }
    aem_vmt_destroy(h.t, 0);
    h.t = NULL;
    free(sizes);
    free(slots);
    free(h.off);
    free(h.gen);
    free(h.ptr);
    return PyFloat_FromDouble(result);
out:
    aem_vmt_destroy(h.t, 0);
    free(sizes);
    free(slots);
    free(h.off);
    free(h.gen);
    free(h.ptr);
    return NULL;
}

/* Fill a pool with random sizes (log-uniform lo..hi) until `fill` of it is in use. */
static double fill_pool(aem_vmt *t, double fill, uint64_t *s, uint64_t lo, uint64_t hi) {
    aem_vmt_stats st;
    uint64_t size = aem_vmt_size(t), used = 0, target = (uint64_t)(fill * (double)size), off;
    uint32_t gen;
    int misses = 0;
    while (used < target && misses < 64) {
        uint64_t n = rng_size(s, lo, hi);
        if (used + aem_vmt_granted(t, n) > target) n = lo;
        if (aem_vmt_alloc(t, n, &off, &gen) == 0) {
            used += aem_vmt_granted(t, n);
            misses = 0;
        } else {
            misses++;
        }
    }
    aem_vmt_get_stats(t, &st);
    return (double)st.used / (double)size;
}

/* _vmt_latency(pool_size, fill, count, seed=1, zone=TBL_UZONE) -> (samples_ns, fill_reached, failures)
 * A pool (not populated) holding a ring of 16 blocks, then filled to `fill`
 * with random sizes 64 B .. 64 KiB; then `count` times: free a random block of
 * the ring (untimed) and allocate a random size 64 B .. 4 KiB in its place,
 * timed alone with the CPU's counter (the counter's own cost subtracted).
 * Allocations that find no block (a full pool's rare misses) are counted, not timed. */
static PyObject *py_vmt_latency(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pool_size", "fill", "count", "seed", "zone", NULL};
    unsigned long long pool;
    double fill;
    Py_ssize_t count;
    unsigned long long seed = 1;
    int zone = AEM_VMT_UZONE;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Kdn|Ki:_vmt_latency", kwlist, &pool, &fill, &count, &seed,
                                     &zone))
        return NULL;
    if (count < 1 || fill < 0 || fill > 0.99) {
        PyErr_SetString(PyExc_ValueError, "count >= 1 and 0 <= fill <= 0.99");
        return NULL;
    }
    aem_vmt *t;
    aem_vmt_config cfg = {.size = pool, .min_block = 64, .zone = zone, .flags = AEM_VMT_F_LAZY};
    int rc = aem_vmt_create(&cfg, &t);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    enum { RING = 16 };
    uint64_t ring_off[RING], s = seed | 1;
    uint32_t ring_gen[RING];
    double *samples = malloc((size_t)count * sizeof *samples);
    if (!samples) {
        aem_vmt_destroy(t, 0);
        return PyErr_NoMemory();
    }
    double reached = 0, tick_ns = 1;
    Py_ssize_t kept = 0;
    long failures = 0;
    Py_BEGIN_ALLOW_THREADS
    tick_ns = ns_per_tick();
    for (int i = 0; i < RING; i++)
        if (aem_vmt_alloc(t, rng_size(&s, 64, 4096), &ring_off[i], &ring_gen[i]) < 0) ring_off[i] = UINT64_MAX;
    reached = fill_pool(t, fill, &s, 64, 65536);
    /* The cost of reading the counter twice, to subtract. */
    uint64_t overhead = UINT64_MAX;
    for (int i = 0; i < 1000; i++) {
        uint64_t a = ticks(), b = ticks();
        if (b - a < overhead) overhead = b - a;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t n = rng_size(&s, 64, 4096), off = UINT64_MAX;
        uint32_t gen = 0;
        int slot = (int)(rng_next(&s) % RING);
        if (ring_off[slot] != UINT64_MAX) aem_vmt_free(t, ring_off[slot], ring_gen[slot]);
        uint64_t a = ticks();
        int r = aem_vmt_alloc(t, n, &off, &gen);
        uint64_t b = ticks();
        ring_off[slot] = r < 0 ? UINT64_MAX : off;
        ring_gen[slot] = gen;
        if (r < 0) {
            failures++;
            continue;
        }
        uint64_t d = b - a > overhead ? b - a - overhead : 0;
        samples[kept++] = (double)d * tick_ns;
    }
    Py_END_ALLOW_THREADS
    aem_vmt_destroy(t, 0);
    PyObject *list = PyList_New(kept);
    if (!list) {
        free(samples);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < kept; i++) {
        PyObject *f = PyFloat_FromDouble(samples[i]);
        if (!f) {
            free(samples);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, f);
    }
    free(samples);
    return Py_BuildValue("(Ndl)", list, reached, failures);
}

/* _vmt_frag(pool_size, seed=1, free_ratio=0.4, min_block=64) -> dict
 * A random-size flood (log-uniform 64 B .. 64 KiB) with churn: each step frees a
 * random live block with probability free_ratio, else allocates; until the first
 * allocation fails.  The dict gives the state at that first shortage. */
static PyObject *py_vmt_frag(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pool_size", "seed", "free_ratio", "min_block", NULL};
    unsigned long long pool, seed = 1;
    double free_ratio = 0.4;
    unsigned int min_block = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|KdI:_vmt_frag", kwlist, &pool, &seed, &free_ratio,
                                     &min_block))
        return NULL;
    aem_vmt *t;
    aem_vmt_config cfg = {.size = pool, .min_block = min_block, .zone = AEM_VMT_UZONE, .flags = AEM_VMT_F_LAZY};
    int rc = aem_vmt_create(&cfg, &t);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    size_t cap = (size_t)(pool / 64) + 16, live = 0;
    uint64_t *offs = malloc(cap * sizeof *offs), s = seed | 1, failed_size = 0, steps = 0;
    uint32_t *gens = malloc(cap * sizeof *gens);
    if (!offs || !gens) {
        free(offs);
        free(gens);
        aem_vmt_destroy(t, 0);
        return PyErr_NoMemory();
    }
    aem_vmt_stats st;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        steps++;
        if (live && (double)(rng_next(&s) % 1000000) / 1e6 < free_ratio) {
            size_t j = rng_next(&s) % live;
            aem_vmt_free(t, offs[j], gens[j]);
            offs[j] = offs[--live];
            gens[j] = gens[live];
            continue;
        }
        uint64_t n = rng_size(&s, 64, 65536);
        if (live == cap || aem_vmt_alloc(t, n, &offs[live], &gens[live]) < 0) {
            failed_size = n;
            break;
        }
        live++;
    }
    aem_vmt_get_stats(t, &st);  /* caches included: what could be handed out */
    Py_END_ALLOW_THREADS
    free(offs);
    free(gens);
    aem_vmt_destroy(t, 0);
    return Py_BuildValue("{sKsKsKsKsKsdsdsdsdsKsK}", "size", st.size, "used", st.used, "requested",
                         st.requested, "free", st.free, "largest_free", st.largest_free, "granted_over_requested",
                         st.requested ? (double)st.used / (double)st.requested : 1.0, "external_fragmentation",
                         st.free ? 1.0 - (double)st.largest_free / (double)st.free : 0.0, "usable_granted",
                         (double)st.used / (double)st.size, "usable_requested",
                         (double)st.requested / (double)st.size, "failed_size", failed_size, "steps", steps);
}

static PyMethodDef bench_functions[] = {
    {"_vmt_bench", (PyCFunction)(void (*)(void))py_vmt_bench, METH_VARARGS | METH_KEYWORDS,
     "Benchmark loop: ns per alloc+free pair of the vmtable core or glibc malloc."},
    {"_vmt_latency", (PyCFunction)(void (*)(void))py_vmt_latency, METH_VARARGS | METH_KEYWORDS,
     "Benchmark: individually timed allocations in a pool filled to a fraction."},
    {"_vmt_frag", (PyCFunction)(void (*)(void))py_vmt_frag, METH_VARARGS | METH_KEYWORDS,
     "Benchmark: fragmentation at the first shortage of a random-size flood."},
    {NULL},
};

int aem_vmtable_bench_init(PyObject *module) { return PyModule_AddFunctions(module, bench_functions); }
