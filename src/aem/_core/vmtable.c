/* vmtable.c — the buddy allocator of aem's vmtable.  The design is in vmtable.h.
 *
 * Sections:
 *   constants, data structures        the shared header, tags, descriptors, journal
 *   utility functions                 orders, sizes
 *   journaled writes                  every metadata store of a VZONE goes through set*()
 *   the lock                          robust process-shared mutex, recovery from a dead holder
 *   free lists and caches             list_push/list_remove, cache_push/cache_pop
 *   allocate and free                 take_block (split), coalesce (merge), release (punch)
 *   creation, attachment, destruction
 *   queries and statistics
 *   checking                          aem_vmt_check: every invariant, counted
 *   testing                           aem_vmt_debug_hang
 */
#define _GNU_SOURCE
#include "vmtable.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* =====================================================================================
 * Constants
 * ===================================================================================== */

#define VMT_MAGIC        0x31454c4254564d41ull  /* "AMVTBLE1", stored last at creation */
#define VMT_VERSION      1u
#define NIL              UINT32_MAX             /* end of a list (never a unit: units < 2^32) */
#define JOURNAL_MAX      1024u                  /* undo records of one operation */
#define CACHE_MAX        32u                    /* blocks in one order's cache */
#define CACHE_SHARE      6u                     /* a cache holds at most pool >> 6 bytes */
#define RELEASE_MIN      (64u << 10)            /* VZONE: free blocks this big go back to the kernel */
#define ATTACH_WAIT_NS   2000000000ll           /* attach: wait this long for the creator */

/* Tags: one byte per unit.  The first unit of every block holds state << 6 | order;
 * every other unit holds 0. */
enum { T_NONE = 0, T_FREE = 1, T_CACHED = 2, T_USED = 3 };
#define TAG(state, order) ((uint8_t)((unsigned)(state) << 6 | (unsigned)(order)))
#define TAG_STATE(tag)    ((unsigned)(tag) >> 6)
#define TAG_ORDER(tag)    ((unsigned)(tag) & 63u)

/* Every write of one operation is journaled: a split or a merge writes at most
 * ~10 words per order, plus a constant number for the block itself. */
_Static_assert(JOURNAL_MAX >= 16u * AEM_VMT_MAX_ORDERS + 64u, "journal too small for one operation");
_Static_assert(AEM_VMT_MAX_ORDERS <= 32, "units are 32-bit: at most 32 orders");
_Static_assert(AEM_VMT_MAX_ORDERS <= 63, "tag order field is 6 bits");
_Static_assert(AEM_VMT_MIN_BLOCK_MIN >= 16, "a descriptor describes at least 16 bytes");

/* =====================================================================================
 * Data structures
 * ===================================================================================== */

/* One block of order k, found at descs[k][unit >> k]. */
typedef struct {
    union {
        struct {
            uint32_t next, prev;  /* free: neighbours in its list; cached: next only */
        } link;
        uint64_t requested;       /* allocated: the bytes asked for */
    };
    uint32_t gen;                 /* allocated: generation stamped by aem_vmt_alloc */
    uint32_t spare;
} vmt_desc;
_Static_assert(sizeof(vmt_desc) == 16, "descriptors are 16 bytes");

/* An undo record: the old value of a word of metadata. */
typedef struct {
    uint64_t where;  /* byte offset in the metadata << 4 | width (1, 4 or 8) */
    uint64_t old;
} vmt_undo;

/* The lists and counts of one order (two orders per cache line). */
typedef struct {
    uint32_t free_head, free_count;    /* the free list (doubly linked) */
    uint32_t cache_head, cache_count;  /* recently freed blocks (singly linked) */
    uint32_t used_count;               /* blocks in use */
    uint32_t cache_max;                /* bound of the cache (read-only) */
    uint32_t pad[2];
} vmt_order;
_Static_assert(sizeof(vmt_order) == 32, "two orders per cache line");

/* The header: first part of the metadata, shared by every process of a VZONE. */
typedef struct {
    /* ---- set at creation, then read-only ---- */
    uint64_t magic;
    uint32_t version, hdr_size;
    uint64_t pool_size, meta_size, units, id;
    uint32_t min_shift, max_order, zone, release_order;
    uint64_t tag_off, desc_off[AEM_VMT_MAX_ORDERS];
    pthread_mutex_t lock;  /* VZONE: robust, process-shared */

    /* ---- allocator state: journaled ---- */
    __attribute__((aligned(64))) uint64_t nonempty;  /* bit k: ord[k].free_head != NIL */
    uint64_t requested_bytes;  /* bytes asked for by the blocks in use (granted: from the counts) */
    uint32_t gen, pad;
    __attribute__((aligned(64))) vmt_order ord[AEM_VMT_MAX_ORDERS];

    /* ---- statistics: plain counters, off the fast path ---- */
    uint64_t splits, merges, drains, releases, shortages, fallbacks, recoveries;

    /* ---- the undo journal of the operation in progress ---- */
    uint32_t jn, jpad;
    vmt_undo journal[JOURNAL_MAX];
} vmt_hdr;

/* A process's handle. */
struct aem_vmt {
    vmt_hdr *h;
    uint8_t *meta;                    /* the metadata mapping (header first) */
    size_t meta_len;
    uint8_t *tags;
    vmt_desc *desc[AEM_VMT_MAX_ORDERS];
    char *pool;
    size_t pool_len;
    uint64_t units, max_block;
    unsigned shift, max_order, release_order;
    int zone, fd;
    int journaled;                    /* VZONE: lock and journal every write */
    void *(*before_wait)(void);
    void (*after_wait)(void *);
    uint32_t jn;                      /* length of the journal (h->jn mirrors it) */
    unsigned writes, hang_at;         /* aem_vmt_debug_hang */
    int hang_armed, hang_fd;
    char name[AEM_VMT_NAME_MAX + 1];
};

/* A range to give back to the kernel once the operation is committed. */
typedef struct {
    uint64_t off, len;
} vmt_release;

/* =====================================================================================
 * Utility functions
 * ===================================================================================== */

#define INLINE   inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))

static inline uint64_t round_up(uint64_t x, uint64_t to) { return (x + to - 1) / to * to; }

static inline uint64_t order_bytes(const aem_vmt *t, unsigned k) {
    return (uint64_t)1 << (k + t->shift);
}

static inline uint32_t order_units(unsigned k) { return (uint32_t)1 << k; }

/* The smallest order whose blocks hold n >= 1 bytes. */
static inline unsigned order_of(const aem_vmt *t, uint64_t n) {
    uint64_t units_minus_1 = (n - 1) >> t->shift;
    return units_minus_1 ? 64u - (unsigned)__builtin_clzll(units_minus_1) : 0u;
}

static inline vmt_desc *desc_of(const aem_vmt *t, unsigned k, uint32_t u) {
    return &t->desc[k][u >> k];
}

static inline uint64_t largest_free_locked(const aem_vmt *t) {
    const vmt_hdr *h = t->h;
    int best = h->nonempty ? 63 - __builtin_clzll(h->nonempty) : -1;
    for (int k = (int)t->max_order; k > best; k--)
        if (h->ord[k].cache_head != NIL) {
            best = k;
            break;
        }
    return best < 0 ? 0 : order_bytes(t, (unsigned)best);
}

/* Bytes in the blocks counted by one field of vmt_order (free_count, cache_count, used_count). */
static uint64_t count_bytes(const aem_vmt *t, size_t field) {
    uint64_t sum = 0;
    for (unsigned k = 0; k <= t->max_order; k++)
        sum += (uint64_t)*(const uint32_t *)((const char *)&t->h->ord[k] + field) << (k + t->shift);
    return sum;
}

#define COUNT_BYTES(t, field) count_bytes((t), offsetof(vmt_order, field))

static inline uint64_t cached_bytes(const aem_vmt *t) { return COUNT_BYTES(t, cache_count); }

static void fatal(const char *why) {
    fprintf(stderr, "aem vmtable: %s\n", why);
    abort();
}

/* =====================================================================================
 * Journaled writes
 *
 * In a VZONE every store to metadata is set8/set32/set64: the old value is
 * appended to the journal, the journal's length published, then the store made.
 * A compiler barrier orders the three (a killed process's stores are all seen,
 * in program order, by the process that recovers the lock).  commit() empties
 * the journal when the operation is complete; undo() restores it backwards.
 * ===================================================================================== */

static void hang_now(aem_vmt *t) {
    char c = 'h';
    if (write(t->hang_fd, &c, 1) < 0) { /* the test will notice */ }
    for (;;) pause();
}

static void journal_slow(aem_vmt *t) {
    if (t->hang_armed && t->writes++ == t->hang_at) hang_now(t);
    if (t->jn >= JOURNAL_MAX) fatal("journal overflow: an operation wrote more words than it can");
}

static INLINE void journal(aem_vmt *t, void *p, unsigned width, uint64_t old) {
    if (__builtin_expect(t->jn >= JOURNAL_MAX || t->hang_armed, 0)) journal_slow(t);
    uint32_t n = t->jn;
    vmt_undo *e = &t->h->journal[n];
    e->where = (uint64_t)((uint8_t *)p - t->meta) << 4 | width;
    e->old = old;
    t->jn = n + 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(&t->h->jn, n + 1, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static INLINE void set8(aem_vmt *t, int j, uint8_t *p, uint8_t v) {
    if (j) journal(t, p, 1, *p);
    *p = v;
}

static INLINE void set32(aem_vmt *t, int j, uint32_t *p, uint32_t v) {
    if (j) journal(t, p, 4, *p);
    *p = v;
}

static INLINE void set64(aem_vmt *t, int j, uint64_t *p, uint64_t v) {
    if (j) journal(t, p, 8, *p);
    *p = v;
}

static INLINE void commit(aem_vmt *t) {
    if (!t->journaled) return;
    t->jn = 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(&t->h->jn, 0, __ATOMIC_RELAXED);
}

/* Restore the state before the interrupted operation.  Idempotent: a process
 * killed while undoing leaves the journal for the next one. */
static void undo(aem_vmt *t) {
    vmt_hdr *h = t->h;
    uint32_t n = h->jn < JOURNAL_MAX ? h->jn : JOURNAL_MAX;
    for (uint32_t i = n; i-- > 0;) {
        uint64_t off = h->journal[i].where >> 4, old = h->journal[i].old;
        unsigned width = (unsigned)(h->journal[i].where & 15u);
        if (off + width > t->meta_len || off < offsetof(vmt_hdr, nonempty)) continue;  /* not ours */
        uint8_t *p = t->meta + off;
        if (width == 1) *p = (uint8_t)old;
        else if (width == 4) *(uint32_t *)p = (uint32_t)old;
        else if (width == 8) *(uint64_t *)p = old;
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(&h->jn, 0, __ATOMIC_RELAXED);
}

/* =====================================================================================
 * The lock (VZONE)
 * ===================================================================================== */

static INLINE int vmt_lock(aem_vmt *t) {
    if (!t->journaled) return 0;
    pthread_mutex_t *m = &t->h->lock;
    int rc = pthread_mutex_trylock(m);
    if (rc == EBUSY) {
        void *state = t->before_wait ? t->before_wait() : NULL;
        rc = pthread_mutex_lock(m);
        if (t->after_wait) t->after_wait(state);
    }
    if (rc == EOWNERDEAD) {
        /* The holder died: roll its operation back, then the state is whole again. */
        undo(t);
        t->h->recoveries++;
        rc = pthread_mutex_consistent(m);
        if (rc != 0) {
            pthread_mutex_unlock(m);
            return -rc;
        }
    }
    t->writes = 0;
    t->jn = 0;
    return -rc;
}

static INLINE void vmt_unlock(aem_vmt *t) {
    if (t->journaled) pthread_mutex_unlock(&t->h->lock);
}

/* =====================================================================================
 * Free lists (doubly linked, per order) and caches (singly linked, per order)
 * ===================================================================================== */

static INLINE void list_push(aem_vmt *t, int j, unsigned k, uint32_t u) {
    vmt_hdr *h = t->h;
    vmt_desc *d = desc_of(t, k, u);
    uint32_t head = h->ord[k].free_head;
    set32(t, j, &d->link.next, head);
    set32(t, j, &d->link.prev, NIL);
    if (head != NIL) set32(t, j, &desc_of(t, k, head)->link.prev, u);
    else set64(t, j, &h->nonempty, h->nonempty | (1ull << k));
    set32(t, j, &h->ord[k].free_head, u);
    set32(t, j, &h->ord[k].free_count, h->ord[k].free_count + 1);
}

static INLINE void list_remove(aem_vmt *t, int j, unsigned k, uint32_t u) {
    vmt_hdr *h = t->h;
    vmt_desc *d = desc_of(t, k, u);
    uint32_t next = d->link.next, prev = d->link.prev;
    if (prev != NIL) set32(t, j, &desc_of(t, k, prev)->link.next, next);
    else set32(t, j, &h->ord[k].free_head, next);
    if (next != NIL) set32(t, j, &desc_of(t, k, next)->link.prev, prev);
    if (h->ord[k].free_head == NIL) set64(t, j, &h->nonempty, h->nonempty & ~(1ull << k));
    set32(t, j, &h->ord[k].free_count, h->ord[k].free_count - 1);
}

static INLINE void cache_push(aem_vmt *t, int j, unsigned k, uint32_t u) {
    vmt_hdr *h = t->h;
    set32(t, j, &desc_of(t, k, u)->link.next, h->ord[k].cache_head);
    set32(t, j, &h->ord[k].cache_head, u);
    set32(t, j, &h->ord[k].cache_count, h->ord[k].cache_count + 1);
}

static INLINE uint32_t cache_pop(aem_vmt *t, int j, unsigned k) {
    vmt_hdr *h = t->h;
    uint32_t u = h->ord[k].cache_head;
    set32(t, j, &h->ord[k].cache_head, desc_of(t, k, u)->link.next);
    set32(t, j, &h->ord[k].cache_count, h->ord[k].cache_count - 1);
    return u;
}

/* =====================================================================================
 * Allocate and free
 * ===================================================================================== */

/* The smallest free block of order >= k, out of its list, split down to k
 * (each upper half goes to the free list of its order).  -EAGAIN: none, but
 * the caches hold some; -ENOMEM: none at all. */
static NOINLINE int split_from_lists(aem_vmt *t, unsigned k, uint32_t *out) {
    const int j = t->journaled;
    vmt_hdr *h = t->h;
    uint64_t avail = h->nonempty & (~0ull << k);
    if (!avail) return cached_bytes(t) ? -EAGAIN : -ENOMEM;
    unsigned m = (unsigned)__builtin_ctzll(avail);
    uint32_t u = h->ord[m].free_head;
    list_remove(t, j, m, u);
    while (m > k) {  /* split: keep the lower half, free the upper */
        m--;
        uint32_t v = u + order_units(m);
        set8(t, j, &t->tags[v], TAG(T_FREE, m));
        list_push(t, j, m, v);
        h->splits++;
    }
    *out = u;
    return 0;
}

/* A free block of order k: the cache's most recent, else from the free lists. */
static INLINE int take_block(aem_vmt *t, int j, unsigned k, uint32_t *out) {
    vmt_hdr *h = t->h;
    if (__builtin_expect(h->ord[k].cache_head == NIL, 0)) return split_from_lists(t, k, out);
    *out = cache_pop(t, j, k);
    return 0;
}

static INLINE int alloc_locked(aem_vmt *t, int j, unsigned k, uint64_t n, uint64_t *off, uint32_t *gen) {
    vmt_hdr *h = t->h;
    uint32_t u;
    int rc = take_block(t, j, k, &u);
    if (rc < 0) return rc;
    set8(t, j, &t->tags[u], TAG(T_USED, k));
    uint32_t g = h->gen + 1;
    if (g == AEM_VMT_ANY_GEN) g++;
    set32(t, j, &h->gen, g);
    vmt_desc *d = desc_of(t, k, u);
    set64(t, j, &d->requested, n);
    set32(t, j, &d->gen, g);
    set32(t, j, &h->ord[k].used_count, h->ord[k].used_count + 1);
    set64(t, j, &h->requested_bytes, h->requested_bytes + n);
    *off = (uint64_t)u << t->shift;
    *gen = g;
    return 0;
}

/* Merge the free block (u, k) with its free buddies, then list it.  A VZONE
 * block that reaches RELEASE_MIN bytes (or was that big) is to be punched. */
static NOINLINE void coalesce(aem_vmt *t, uint32_t u, unsigned k, vmt_release *rel) {
    const int j = t->journaled;
    vmt_hdr *h = t->h;
    if (k >= t->release_order) *rel = (vmt_release){(uint64_t)u << t->shift, order_bytes(t, k)};
    while (k < t->max_order) {
        uint32_t v = u ^ order_units(k);
        if ((uint64_t)v + order_units(k) > t->units || t->tags[v] != TAG(T_FREE, k)) break;
        list_remove(t, j, k, v);
        if (v > u) {
            set8(t, j, &t->tags[v], 0);
        } else {
            set8(t, j, &t->tags[u], 0);
            u = v;
        }
        k++;
        h->merges++;
        if (k == t->release_order) *rel = (vmt_release){(uint64_t)u << t->shift, order_bytes(t, k)};
    }
    set8(t, j, &t->tags[u], TAG(T_FREE, k));
    list_push(t, j, k, u);
}

/* Give the pages of a free block back to the kernel (VZONE), after commit. */
static void release(aem_vmt *t, const vmt_release *rel) {
    if (!rel->len || t->fd < 0) return;
    if (fallocate(t->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(t->meta_len + rel->off),
                  (off_t)rel->len) < 0)
        madvise(t->pool + rel->off, rel->len, MADV_REMOVE);
    t->h->releases++;
}

static INLINE int free_locked(aem_vmt *t, int j, uint32_t u, uint32_t gen, vmt_release *rel) {
    vmt_hdr *h = t->h;
    uint8_t tag = t->tags[u];
    if (TAG_STATE(tag) != T_USED) return tag ? -EALREADY : -EINVAL;
    unsigned k = TAG_ORDER(tag);
    vmt_desc *d = desc_of(t, k, u);
    if (gen != AEM_VMT_ANY_GEN && d->gen != gen) return -ESTALE;
    set32(t, j, &h->ord[k].used_count, h->ord[k].used_count - 1);
    set64(t, j, &h->requested_bytes, h->requested_bytes - d->requested);
    if (h->ord[k].cache_count < h->ord[k].cache_max) {  /* recently freed: kept as it is */
        set8(t, j, &t->tags[u], TAG(T_CACHED, k));
        cache_push(t, j, k, u);
        return 0;
    }
    coalesce(t, u, k, rel);
    return 0;
}

/* Each cached block merged back as one committed step (a crash between two
 * steps leaves a whole state; one step fits in the journal). */
static long drain_locked(aem_vmt *t) {
    const int j = t->journaled;
    vmt_hdr *h = t->h;
    long n = 0;
    for (unsigned k = 0; k <= t->max_order; k++) {
        while (h->ord[k].cache_head != NIL) {
            vmt_release rel = {0, 0};
            uint32_t u = cache_pop(t, j, k);
            coalesce(t, u, k, &rel);
            commit(t);
            release(t, &rel);
            n++;
        }
    }
    if (n) h->drains++;
    return n;
}

/* After a miss that only cached blocks could serve: coalesce them, try again. */
static NOINLINE int alloc_after_drain(aem_vmt *t, unsigned k, uint64_t n, uint64_t *off, uint32_t *gen) {
    drain_locked(t);
    int rc = alloc_locked(t, t->journaled, k, n, off, gen);
    return rc == -EAGAIN ? -ENOMEM : rc;
}

int aem_vmt_alloc(aem_vmt *t, uint64_t n, uint64_t *off, uint32_t *gen) {
    if (n == 0) return -EINVAL;
    if (n > t->max_block) return -E2BIG;
    unsigned k = order_of(t, n);
    if (!t->journaled) {  /* a private zone: no lock, no journal */
        int rc = alloc_locked(t, 0, k, n, off, gen);
        return rc == -EAGAIN ? alloc_after_drain(t, k, n, off, gen) : rc;
    }
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    rc = alloc_locked(t, 1, k, n, off, gen);
    if (rc == -EAGAIN) {
        commit(t);
        rc = alloc_after_drain(t, k, n, off, gen);
    }
    commit(t);
    vmt_unlock(t);
    return rc;
}

int aem_vmt_free(aem_vmt *t, uint64_t off, uint32_t gen) {
    if (off >= aem_vmt_size(t) || (off & ((1ull << t->shift) - 1))) return -EINVAL;
    uint32_t u = (uint32_t)(off >> t->shift);
    vmt_release rel = {0, 0};
    if (!t->journaled) return free_locked(t, 0, u, gen, &rel);  /* nothing to release: UZONE */
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    rc = free_locked(t, 1, u, gen, &rel);
    commit(t);
    release(t, &rel);
    vmt_unlock(t);
    return rc;
}

long aem_vmt_drain(aem_vmt *t) {
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    long n = drain_locked(t);
    vmt_unlock(t);
    return n;
}

/* =====================================================================================
 * Creation, attachment, destruction
 * ===================================================================================== */

static int check_name(const char *name, char *out) {
    size_t len = strlen(name);
    const char *bare = name[0] == '/' ? name + 1 : name;
    if (!*bare || len > AEM_VMT_NAME_MAX - 1 || strchr(bare, '/')) return -EINVAL;
    snprintf(out, AEM_VMT_NAME_MAX + 1, "/%s", bare);
    return 0;
}

/* The process-local pointers, from a mapped, initialised header. */
static void bind(aem_vmt *t) {
    vmt_hdr *h = t->h;
    t->units = h->units;
    t->shift = h->min_shift;
    t->max_order = h->max_order;
    t->release_order = h->release_order;
    t->max_block = order_bytes(t, t->max_order);
    t->zone = (int)h->zone;
    t->journaled = t->zone == AEM_VMT_VZONE;
    t->tags = t->meta + h->tag_off;
    for (unsigned k = 0; k <= t->max_order; k++) t->desc[k] = (vmt_desc *)(t->meta + h->desc_off[k]);
}

static void unmap(aem_vmt *t) {
    if (t->pool && t->pool != MAP_FAILED) munmap(t->pool, t->pool_len);
    if (t->meta && t->meta != MAP_FAILED) munmap(t->meta, t->meta_len);
    if (t->fd >= 0) close(t->fd);
    free(t);
}

int aem_vmt_create(const aem_vmt_config *cfg, aem_vmt **out) {
    uint32_t mb = cfg->min_block;
    if (mb < AEM_VMT_MIN_BLOCK_MIN || (mb & (mb - 1)) || mb > (1u << 30)) return -EINVAL;
    if (cfg->size == 0 || (cfg->zone != AEM_VMT_UZONE && cfg->zone != AEM_VMT_VZONE)) return -EINVAL;
    if (cfg->name && cfg->zone != AEM_VMT_VZONE) return -EINVAL;
    unsigned shift = (unsigned)__builtin_ctz(mb);
    uint64_t units = (cfg->size + mb - 1) >> shift;
    if (units > UINT32_MAX) return -E2BIG;

    aem_vmt *t = calloc(1, sizeof *t);
    if (!t) return -ENOMEM;
    t->fd = -1;
    int rc = 0;
    if (cfg->name && (rc = check_name(cfg->name, t->name)) < 0) goto fail;

    /* Layout of the metadata: header | tags | descriptors of order 0 | 1 | ... */
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    unsigned max_order = 63u - (unsigned)__builtin_clzll(units);
    uint64_t hdr_size = round_up(sizeof(vmt_hdr), 64), at = hdr_size, tag_off = at;
    at += round_up(units, 64);
    uint64_t desc_off[AEM_VMT_MAX_ORDERS] = {0};
    for (unsigned k = 0; k <= max_order; k++) {
        desc_off[k] = at;
        at += round_up((units >> k) * sizeof(vmt_desc), 64);
    }
    t->meta_len = round_up(at, page);
    t->pool_len = round_up(units << shift, page);

    if (cfg->zone == AEM_VMT_UZONE) {
        t->meta = mmap(NULL, t->meta_len, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (t->meta == MAP_FAILED) goto fail_errno;
        int populate = (cfg->flags & AEM_VMT_F_LAZY) ? MAP_NORESERVE : MAP_POPULATE;
        t->pool = mmap(NULL, t->pool_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | populate,
                       -1, 0);
        if (t->pool == MAP_FAILED) goto fail_errno;
    } else {
        t->fd = cfg->name ? shm_open(t->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600)
                          : memfd_create("aem-vmtable", MFD_CLOEXEC);
        if (t->fd < 0) goto fail_errno;
        if (ftruncate(t->fd, (off_t)(t->meta_len + t->pool_len)) < 0) goto fail_unlink;
        t->meta = mmap(NULL, t->meta_len, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, 0);
        if (t->meta == MAP_FAILED) goto fail_unlink;
        t->pool = mmap(NULL, t->pool_len, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, (off_t)t->meta_len);
        if (t->pool == MAP_FAILED) goto fail_unlink;
    }

    /* The header, with every list empty. */
    vmt_hdr *h = t->h = (vmt_hdr *)t->meta;
    h->version = VMT_VERSION;
    h->hdr_size = (uint32_t)hdr_size;
    h->units = units;
    h->pool_size = units << shift;
    h->meta_size = t->meta_len;
    h->min_shift = shift;
    h->max_order = max_order;
    h->zone = (uint32_t)cfg->zone;
    h->tag_off = tag_off;
    memcpy(h->desc_off, desc_off, sizeof desc_off);
    unsigned release_order = 0;  /* the smallest order of RELEASE_MIN bytes and a page or more */
    while ((1ull << (release_order + shift)) < RELEASE_MIN || (1ull << (release_order + shift)) < page)
        release_order++;
    h->release_order = cfg->zone == AEM_VMT_VZONE ? release_order : AEM_VMT_MAX_ORDERS;
    for (unsigned k = 0; k < AEM_VMT_MAX_ORDERS; k++) {
        h->ord[k].free_head = h->ord[k].cache_head = NIL;
        uint64_t share = k <= max_order ? (units >> CACHE_SHARE) >> k : 0;
        h->ord[k].cache_max = (uint32_t)(share < CACHE_MAX ? share : CACHE_MAX);
    }
    if (getrandom(&h->id, sizeof h->id, 0) != sizeof h->id) h->id = (uint64_t)time(NULL) ^ (uint64_t)t;
    if (cfg->zone == AEM_VMT_VZONE) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        rc = -pthread_mutex_init(&h->lock, &a);
        pthread_mutexattr_destroy(&a);
        if (rc < 0) goto fail_unlink_rc;
    }
    bind(t);
    const int j = 0;  /* nobody else sees it yet: no journal */

    /* Carve the pool into maximal power-of-two blocks, largest first, so each is
     * aligned to its size: the binary decomposition of the number of units. */
    uint32_t u = 0;
    for (int k = (int)max_order; k >= 0; k--) {
        if (!(units & (1ull << k))) continue;
        t->tags[u] = TAG(T_FREE, k);
        list_push(t, j, (unsigned)k, u);
        u += order_units((unsigned)k);
    }
    __atomic_store_n(&h->magic, VMT_MAGIC, __ATOMIC_RELEASE);  /* published: attach may map it */
    *out = t;
    return 0;

fail_errno:
    rc = -errno;
    goto fail;
fail_unlink:
    rc = -errno;
fail_unlink_rc:
    if (t->name[0]) shm_unlink(t->name);
fail:
    unmap(t);
    return rc;
}

int aem_vmt_attach(const char *name, aem_vmt **out) {
    aem_vmt *t = calloc(1, sizeof *t);
    if (!t) return -ENOMEM;
    t->fd = -1;
    int rc = check_name(name, t->name);
    if (rc < 0) goto fail;
    t->fd = shm_open(t->name, O_RDWR | O_CLOEXEC, 0);
    if (t->fd < 0) goto fail_errno;

    /* Wait for the creator to publish the header (it sizes the object first). */
    struct timespec start, now, nap = {0, 1000000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    vmt_hdr head;
    for (;;) {
        struct stat st;
        if (fstat(t->fd, &st) < 0) goto fail_errno;
        if ((uint64_t)st.st_size >= sizeof(vmt_hdr)) {
            vmt_hdr *h = mmap(NULL, sizeof(vmt_hdr), PROT_READ, MAP_SHARED, t->fd, 0);
            if (h == MAP_FAILED) goto fail_errno;
            int ready = __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) == VMT_MAGIC;
            if (ready) head = *h;
            munmap(h, sizeof(vmt_hdr));
            if (ready) {
                if (head.version != VMT_VERSION || head.zone != AEM_VMT_VZONE ||
                    (uint64_t)st.st_size < head.meta_size + head.pool_size) {
                    rc = -EPROTO;
                    goto fail;
                }
                break;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000000000ll + (now.tv_nsec - start.tv_nsec) > ATTACH_WAIT_NS) {
            rc = -EPROTO;  /* not a vmtable, or its creator died while making it */
            goto fail;
        }
        nanosleep(&nap, NULL);
    }
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    t->meta_len = head.meta_size;
    t->pool_len = round_up(head.pool_size, page);
    t->meta = mmap(NULL, t->meta_len, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, 0);
    if (t->meta == MAP_FAILED) goto fail_errno;
    t->pool = mmap(NULL, t->pool_len, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, (off_t)t->meta_len);
    if (t->pool == MAP_FAILED) goto fail_errno;
    t->h = (vmt_hdr *)t->meta;
    bind(t);
    *out = t;
    return 0;

fail_errno:
    rc = -errno;
fail:
    unmap(t);
    return rc;
}

void aem_vmt_destroy(aem_vmt *t, int unlink_name) {
    if (!t) return;
    if (unlink_name && t->name[0]) shm_unlink(t->name);
    unmap(t);
}

void aem_vmt_set_wait_hooks(aem_vmt *t, void *(*before)(void), void (*after)(void *)) {
    t->before_wait = before;
    t->after_wait = after;
}

/* =====================================================================================
 * Queries and statistics
 * ===================================================================================== */

char *aem_vmt_base(const aem_vmt *t) { return t->pool; }
uint64_t aem_vmt_size(const aem_vmt *t) { return t->units << t->shift; }
uint64_t aem_vmt_max_block(const aem_vmt *t) { return t->max_block; }
uint32_t aem_vmt_min_block(const aem_vmt *t) { return 1u << t->shift; }
int aem_vmt_zone(const aem_vmt *t) { return t->zone; }
const char *aem_vmt_name(const aem_vmt *t) { return t->name; }
int aem_vmt_fd(const aem_vmt *t) { return t->fd; }
uint64_t aem_vmt_id(const aem_vmt *t) { return t->h->id; }

uint64_t aem_vmt_granted(const aem_vmt *t, uint64_t n) {
    return n == 0 || n > t->max_block ? 0 : order_bytes(t, order_of(t, n));
}

static void fill_block(const aem_vmt *t, uint32_t u, unsigned k, aem_vmt_block *out) {
    const vmt_desc *d = desc_of(t, k, u);
    out->offset = (uint64_t)u << t->shift;
    out->size = order_bytes(t, k);
    out->requested = d->requested;
    out->gen = d->gen;
}

int aem_vmt_lookup(aem_vmt *t, uint64_t off, aem_vmt_block *out) {
    if (off >= aem_vmt_size(t) || (off & ((1ull << t->shift) - 1))) return -EINVAL;
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    uint32_t u = (uint32_t)(off >> t->shift);
    uint8_t tag = t->tags[u];
    if (TAG_STATE(tag) != T_USED) rc = tag ? -EALREADY : -EINVAL;
    else fill_block(t, u, TAG_ORDER(tag), out);
    vmt_unlock(t);
    return rc;
}

int aem_vmt_find(aem_vmt *t, uint64_t off, uint64_t n, aem_vmt_block *out) {
    uint64_t size = aem_vmt_size(t);
    if (off >= size || n > size - off) return -EINVAL;
    /* The block containing unit u0 starts at u0 rounded down to its order: the
     * first unit with a tag, rounding down to orders 0, 1, 2 ... */
    uint32_t u0 = (uint32_t)(off >> t->shift);
    for (unsigned k = 0; k <= t->max_order; k++) {
        uint32_t head = u0 & ~(order_units(k) - 1u);
        uint8_t tag = __atomic_load_n(&t->tags[head], __ATOMIC_RELAXED);
        if (!tag) continue;
        unsigned o = TAG_ORDER(tag);
        if (TAG_STATE(tag) != T_USED || o < k || o > t->max_order) return -EINVAL;
        if (((uint64_t)head << t->shift) + order_bytes(t, o) < off + n) return -EINVAL;
        fill_block(t, head, o, out);
        return 0;
    }
    return -EINVAL;
}

int aem_vmt_valid(const aem_vmt *t, uint64_t off, uint32_t gen) {
    if (off >= aem_vmt_size(t) || (off & ((1ull << t->shift) - 1))) return 0;
    uint32_t u = (uint32_t)(off >> t->shift);
    uint8_t tag = __atomic_load_n(&t->tags[u], __ATOMIC_RELAXED);
    if (TAG_STATE(tag) != T_USED || TAG_ORDER(tag) > t->max_order) return 0;
    return __atomic_load_n(&desc_of(t, TAG_ORDER(tag), u)->gen, __ATOMIC_RELAXED) == gen;
}

int aem_vmt_get_stats(aem_vmt *t, aem_vmt_stats *st) {
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    const vmt_hdr *h = t->h;
    memset(st, 0, sizeof *st);
    st->size = aem_vmt_size(t);
    st->used = COUNT_BYTES(t, used_count);
    st->requested = h->requested_bytes;
    st->cached = COUNT_BYTES(t, cache_count);
    st->free = COUNT_BYTES(t, free_count) + st->cached;
    st->largest_free = largest_free_locked(t);
    st->max_order = t->max_order;
    st->min_block = 1u << t->shift;
    for (unsigned k = 0; k < AEM_VMT_MAX_ORDERS; k++) {
        st->free_count[k] = h->ord[k].free_count;
        st->cache_count[k] = h->ord[k].cache_count;
        st->used_count[k] = h->ord[k].used_count;
    }
    st->splits = h->splits;
    st->merges = h->merges;
    st->drains = h->drains;
    st->releases = h->releases;
    st->shortages = h->shortages;
    st->fallbacks = h->fallbacks;
    st->recoveries = h->recoveries;
    vmt_unlock(t);
    return 0;
}

void aem_vmt_note(aem_vmt *t, int shortage, int fallback) {
    if (vmt_lock(t) < 0) return;
    t->h->shortages += shortage != 0;
    t->h->fallbacks += fallback != 0;
    vmt_unlock(t);
}

/* =====================================================================================
 * Checking: every invariant of the structure, each violation reported and counted
 * ===================================================================================== */

typedef struct {
    aem_vmt_report_fn report;
    void *arg;
    long violations;
} checker;

__attribute__((format(printf, 2, 3))) static void violation(checker *c, const char *fmt, ...) {
    c->violations++;
    if (!c->report) return;
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    c->report(c->arg, buf);
}

#define CHECK(cond, ...)                          \
    do {                                          \
        if (!(cond)) violation(&c, __VA_ARGS__); \
    } while (0)

long aem_vmt_check(aem_vmt *t, unsigned flags, aem_vmt_report_fn report, void *arg) {
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    const vmt_hdr *h = t->h;
    checker c = {report, arg, 0};
    uint64_t walk_free[AEM_VMT_MAX_ORDERS] = {0}, walk_cached[AEM_VMT_MAX_ORDERS] = {0},
             walk_used[AEM_VMT_MAX_ORDERS] = {0};
    uint64_t free_b = 0, cached_b = 0, used_b = 0, requested = 0;

    /* The header. */
    CHECK(h->magic == VMT_MAGIC, "header: bad magic %#llx", (unsigned long long)h->magic);
    CHECK(h->units == t->units && h->min_shift == t->shift && h->max_order == t->max_order,
          "header: geometry changed under this process");
    CHECK(t->units >> t->max_order == 1, "header: max_order %u does not fit %llu units", t->max_order,
          (unsigned long long)t->units);
    CHECK(h->jn == 0, "journal: %u undo records left by an unfinished operation", h->jn);
    CHECK((h->nonempty >> (t->max_order + 1)) == 0, "bitmap: bits set above max_order");

    /* Every block, in address order: the tags tile the pool. */
    uint64_t u = 0, blocks = 0;
    while (u < t->units) {
        uint8_t tag = t->tags[u];
        unsigned k = TAG_ORDER(tag), st = TAG_STATE(tag);
        if (st == T_NONE) {
            violation(&c, "block walk: unit %llu should start a block but has tag 0 (the walk stops)",
                      (unsigned long long)u);
            break;
        }
        if (k > t->max_order || u % order_units(k) || u + order_units(k) > t->units) {
            violation(&c, "block walk: block at unit %llu of order %u is misaligned or beyond the pool "
                      "(the walk stops)", (unsigned long long)u, k);
            break;
        }
        uint64_t bytes = order_bytes(t, k);
        blocks++;
        if (st == T_FREE) {
            walk_free[k]++;
            free_b += bytes;
            uint32_t v = (uint32_t)u ^ order_units(k);
            if (k < t->max_order && (uint64_t)v + order_units(k) <= t->units)
                CHECK(t->tags[v] != TAG(T_FREE, k),
                      "free blocks at units %llu and %u of order %u are buddies: they should have coalesced",
                      (unsigned long long)u, v, k);
        } else if (st == T_CACHED) {
            walk_cached[k]++;
            cached_b += bytes;
        } else {
            const vmt_desc *d = desc_of(t, k, (uint32_t)u);
            walk_used[k]++;
            used_b += bytes;
            requested += d->requested;
            CHECK(d->requested >= 1 && d->requested <= bytes,
                  "allocated block at unit %llu: %llu bytes requested in a block of %llu",
                  (unsigned long long)u, (unsigned long long)d->requested, (unsigned long long)bytes);
            CHECK(k == 0 || d->requested > bytes / 2,
                  "allocated block at unit %llu: order %u is larger than %llu bytes need",
                  (unsigned long long)u, k, (unsigned long long)d->requested);
            CHECK(d->gen != AEM_VMT_ANY_GEN, "allocated block at unit %llu has generation 0",
                  (unsigned long long)u);
        }
        if (flags & AEM_VMT_CHECK_FULL) {
            for (uint64_t w = u + 1; w < u + order_units(k); w++)
                if (t->tags[w]) {
                    violation(&c, "unit %llu inside the block at unit %llu has tag %#x (should be 0)",
                              (unsigned long long)w, (unsigned long long)u, t->tags[w]);
                    break;
                }
        }
        u += order_units(k);
    }

    /* Free lists: doubly linked, every member a free block of the list's order. */
    for (unsigned k = 0; k < AEM_VMT_MAX_ORDERS; k++) {
        uint64_t n = 0, limit = k <= t->max_order ? (t->units >> k) + 1 : 1;
        uint32_t prev = NIL;
        for (uint32_t x = h->ord[k].free_head; x != NIL; x = desc_of(t, k, x)->link.next) {
            if (k > t->max_order || x >= t->units || x % order_units(k) || ++n > limit) {
                violation(&c, "free list %u: bad member %u or a cycle (the walk stops)", k, x);
                break;
            }
            CHECK(t->tags[x] == TAG(T_FREE, k), "free list %u: unit %u has tag %#x, not free of order %u",
                  k, x, t->tags[x], k);
            CHECK(desc_of(t, k, x)->link.prev == prev, "free list %u: unit %u has a wrong back link", k, x);
            prev = x;
        }
        CHECK(n == h->ord[k].free_count, "free list %u: %llu members, count says %u", k,
              (unsigned long long)n, h->ord[k].free_count);
        CHECK(k > t->max_order || n == walk_free[k],
              "free list %u: %llu members, but the block walk found %llu free blocks", k,
              (unsigned long long)n, (unsigned long long)(k <= t->max_order ? walk_free[k] : 0));
        CHECK(!!(h->nonempty & (1ull << k)) == (h->ord[k].free_head != NIL),
              "bitmap: bit %u disagrees with free list %u", k, k);
    }

    /* Caches: singly linked, bounded, every member a cached block of its order. */
    for (unsigned k = 0; k < AEM_VMT_MAX_ORDERS; k++) {
        uint64_t n = 0;
        for (uint32_t x = h->ord[k].cache_head; x != NIL; x = desc_of(t, k, x)->link.next) {
            if (k > t->max_order || x >= t->units || x % order_units(k) || ++n > CACHE_MAX) {
                violation(&c, "cache %u: bad member %u, a cycle or too many members (the walk stops)", k, x);
                break;
            }
            CHECK(t->tags[x] == TAG(T_CACHED, k), "cache %u: unit %u has tag %#x, not cached of order %u",
                  k, x, t->tags[x], k);
        }
        CHECK(n == h->ord[k].cache_count, "cache %u: %llu members, count says %u", k, (unsigned long long)n,
              h->ord[k].cache_count);
        CHECK(h->ord[k].cache_count <= h->ord[k].cache_max, "cache %u: %u members, more than its bound %u", k,
              h->ord[k].cache_count, h->ord[k].cache_max);
        CHECK(k > t->max_order || n == walk_cached[k], "cache %u: %llu members, the block walk found %llu",
              k, (unsigned long long)n, (unsigned long long)(k <= t->max_order ? walk_cached[k] : 0));
        CHECK(k > t->max_order ? h->ord[k].used_count == 0 : h->ord[k].used_count == walk_used[k],
              "order %u: %u blocks counted in use, the block walk found %llu", k, h->ord[k].used_count,
              (unsigned long long)(k <= t->max_order ? walk_used[k] : 0));
    }

    /* The totals. */
    CHECK(h->requested_bytes == requested, "requested bytes: counter %llu, blocks %llu",
          (unsigned long long)h->requested_bytes, (unsigned long long)requested);
    CHECK(c.violations || free_b + cached_b + used_b == aem_vmt_size(t),
          "blocks cover %llu bytes of a pool of %llu",
          (unsigned long long)(free_b + cached_b + used_b),
          (unsigned long long)aem_vmt_size(t));
    (void)blocks;
    vmt_unlock(t);
    return c.violations;
}

/* =====================================================================================
 * Testing
 * ===================================================================================== */

int aem_vmt_debug_hang(aem_vmt *t, int free_op, uint64_t arg, unsigned writes, int notify_fd) {
    if (!t->journaled) return -EINVAL;
    if (free_op ? arg >= aem_vmt_size(t) || (arg & ((1ull << t->shift) - 1)) : arg == 0 || arg > t->max_block)
        return -EINVAL;
    int rc = vmt_lock(t);
    if (rc < 0) return rc;
    t->hang_fd = notify_fd;
    if (writes == 0) hang_now(t);
    t->hang_at = writes;
    t->hang_armed = 1;
    if (free_op) {
        vmt_release rel = {0, 0};
        rc = free_locked(t, 1, (uint32_t)(arg >> t->shift), AEM_VMT_ANY_GEN, &rel);
    } else {
        uint64_t off;
        uint32_t gen;
        rc = alloc_locked(t, 1, order_of(t, arg), arg, &off, &gen);
    }
    if (rc < 0) {  /* nothing was written: give the lock back */
        t->hang_armed = 0;
        commit(t);
        vmt_unlock(t);
        return rc;
    }
    hang_now(t);  /* the operation had fewer writes than asked: hang before commit */
    return 0;
}
