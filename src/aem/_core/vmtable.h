/* vmtable.h — aem's vmtable: a constant-time buddy allocator for event memory.
 * Plain C (no Python here); the Python face is vmtable_py.c.
 *
 * A vmtable manages one pool of memory mapped once at creation.  The pool is
 * cut into blocks of min_block << k bytes ("order k"), each aligned to its own
 * size from the start of the pool (so blocks of a page or more are page
 * aligned).  A pool of any size is carved into maximal power-of-two blocks.
 *
 *   alloc(n):  order k = ceil(log2(n / min_block))
 *              1. the order's cache of recently freed blocks        O(1)
 *              2. the smallest non-empty free list of order >= k:
 *                 bitmap of non-empty orders + count-trailing-zeros O(1)
 *                 then split down to k (at most max_order halvings)
 *              3. nothing: drain the caches (coalescing), retry once;
 *                 still nothing is a shortage (-ENOMEM)
 *   free(off): a full cache takes the block back as it is (no merge);
 *              otherwise merge with the buddy (off XOR size) while it is
 *              free and of the same order, then insert in its free list.
 *
 * The per-order cache is what Linux's per-CPU page lists are to its buddy
 * lists: alternating alloc/free of one size never splits and merges a large
 * block.  It is bounded (at most 1/64 of the pool per order, 32 blocks).
 *
 * Zones:
 *   AEM_VMT_UZONE  private anonymous memory, populated up front (MAP_POPULATE);
 *                  no lock: the caller serialises (aem holds the GIL).
 *                  Inherited by fork() as a private copy.
 *   AEM_VMT_VZONE  a memfd (or the POSIX shm object `name`) mapped shared and
 *                  populated lazily.  Any process mapping it allocates and
 *                  frees under a robust process-shared mutex.  Free blocks of
 *                  64 KiB or more are given back to the kernel (punch hole).
 *
 * Metadata never lives in the pool (a free page is never touched):
 *   header   sizes, free-list heads, bitmap, caches, counters, the lock, the
 *            undo journal
 *   tags     one byte per min_block unit: state and order of the block whose
 *            first unit it is, 0 inside a block
 *   descs    per order k, one 16-byte descriptor per block of order k
 *            (free-list links, or the allocation's generation and size), so
 *            metadata grows with the number of blocks, not with the pool
 * For a VZONE the metadata is the first part of the shared object, mapped
 * separately from the pool; all of it is populated lazily.
 *
 * Crash safety (VZONE): every write to metadata while the lock is held is
 * preceded by an undo record (address, old value) in the header's journal.
 * When a process dies holding the lock, the next locker gets EOWNERDEAD,
 * replays the journal backwards (restoring the state before the interrupted
 * operation) and marks the mutex consistent.  aem_vmt_check() then passes.
 *
 * Integrity: each allocation is stamped with a generation (a counter of the
 * pool); freeing with a stale generation, freeing what is not an allocated
 * block, or a size of 0 or beyond the largest block fail with an error code
 * and change nothing.  aem_vmt_check() walks every block, free list and
 * cache and counts the violations of every invariant.
 *
 * Errors: functions return 0 (or a count) on success, a negative errno on
 * failure, as in the rest of aem's C core.
 */
#ifndef AEM_VMTABLE_H
#define AEM_VMTABLE_H

#include <stddef.h>
#include <stdint.h>

/* ---- zones, limits ------------------------------------------------------------------ */

enum { AEM_VMT_UZONE = 0, AEM_VMT_VZONE = 1 };

#define AEM_VMT_MIN_BLOCK_MIN 16u      /* smallest min_block (one descriptor's worth) */
#define AEM_VMT_MAX_ORDERS    32       /* orders 0..31: pools up to 2^32 min_blocks */
#define AEM_VMT_NAME_MAX      200      /* POSIX shm names, leading '/' included */

/* aem_vmt_config.flags */
#define AEM_VMT_F_LAZY 0x1u            /* UZONE: do not populate the pool (huge benchmark pools) */

typedef struct aem_vmt aem_vmt;        /* one process's handle on a vmtable */

typedef struct {
    uint64_t size;                     /* pool bytes; rounded up to a multiple of min_block */
    uint32_t min_block;                /* smallest block: a power of two >= 16 */
    int zone;                          /* AEM_VMT_UZONE or AEM_VMT_VZONE */
    const char *name;                  /* VZONE: POSIX shm name, or NULL for an anonymous memfd */
    uint32_t flags;                    /* AEM_VMT_F_* */
} aem_vmt_config;

/* ---- create, attach, destroy -------------------------------------------------------- */

/* -EINVAL bad config, -E2BIG too many units, -EEXIST name taken, -ENOMEM, other errno. */
int aem_vmt_create(const aem_vmt_config *cfg, aem_vmt **out);
/* Join the named VZONE created by another process.  -ENOENT, -EPROTO not a vmtable. */
int aem_vmt_attach(const char *name, aem_vmt **out);
/* Unmap (the pool lives on in other processes of a VZONE); unlink_name removes the name. */
void aem_vmt_destroy(aem_vmt *t, int unlink_name);

/* ---- allocate, free ------------------------------------------------------------------- */

#define AEM_VMT_ANY_GEN 0u             /* aem_vmt_free: do not check the generation */

/* A block of at least n bytes: its offset in the pool and generation.
 * -EINVAL n == 0, -E2BIG n larger than the largest block, -ENOMEM shortage. */
int aem_vmt_alloc(aem_vmt *t, uint64_t n, uint64_t *off, uint32_t *gen);
/* Free the block starting at off.  -EINVAL off is not the start of a block,
 * -EALREADY the block is already free, -ESTALE gen is not the block's. */
int aem_vmt_free(aem_vmt *t, uint64_t off, uint32_t gen);

typedef struct {
    uint64_t offset, size, requested;  /* size: granted bytes */
    uint32_t gen;
} aem_vmt_block;

/* The allocated block starting at off (-EINVAL / -EALREADY as for free). */
int aem_vmt_lookup(aem_vmt *t, uint64_t off, aem_vmt_block *out);
/* The allocated block containing [off, off + n): -EINVAL when the range is
 * not inside one allocated block.  Reads without the lock (a hint in a VZONE). */
int aem_vmt_find(aem_vmt *t, uint64_t off, uint64_t n, aem_vmt_block *out);
/* 1 if the allocated block starting at off has generation gen, else 0.
 * Reads without the lock: a cheap check before handing out the block's memory. */
int aem_vmt_valid(const aem_vmt *t, uint64_t off, uint32_t gen);
/* Give every cached block back to the buddy lists (coalescing).  Returns how many. */
long aem_vmt_drain(aem_vmt *t);

/* Granted size for a request of n bytes (0: n is 0 or beyond the largest block). */
uint64_t aem_vmt_granted(const aem_vmt *t, uint64_t n);

/* ---- the pool --------------------------------------------------------------------------- */

char *aem_vmt_base(const aem_vmt *t);          /* first byte of the pool */
uint64_t aem_vmt_size(const aem_vmt *t);        /* pool bytes */
uint64_t aem_vmt_max_block(const aem_vmt *t);   /* largest block the pool can hold */
uint32_t aem_vmt_min_block(const aem_vmt *t);
int aem_vmt_zone(const aem_vmt *t);
const char *aem_vmt_name(const aem_vmt *t);     /* "" when anonymous */
int aem_vmt_fd(const aem_vmt *t);               /* VZONE: the shared object; UZONE: -1 */
uint64_t aem_vmt_id(const aem_vmt *t);          /* random identity of the pool */

/* ---- statistics ------------------------------------------------------------------------- */

typedef struct {
    uint64_t size, used, requested, free, cached, largest_free;
    uint32_t max_order, min_block;
    uint32_t free_count[AEM_VMT_MAX_ORDERS], cache_count[AEM_VMT_MAX_ORDERS],
        used_count[AEM_VMT_MAX_ORDERS];
    uint64_t splits, merges, drains, releases, shortages, fallbacks, recoveries;
} aem_vmt_stats;

int aem_vmt_get_stats(aem_vmt *t, aem_vmt_stats *st);
/* Count a shortage (the request found no block) or a fallback (served from the heap). */
void aem_vmt_note(aem_vmt *t, int shortage, int fallback);

/* ---- checking ---------------------------------------------------------------------------- */

#define AEM_VMT_CHECK_FULL 0x1u        /* also verify every non-head tag is 0: O(units) */

typedef void (*aem_vmt_report_fn)(void *arg, const char *violation);
/* Walk every block, free list and cache; report each violated invariant.
 * Returns the number of violations (0: consistent), or a negative errno. */
long aem_vmt_check(aem_vmt *t, unsigned flags, aem_vmt_report_fn report, void *arg);

/* ---- waiting for the lock (VZONE) ----------------------------------------------------------- */

/* Called around a blocking wait for the lock (aem releases the GIL there). */
void aem_vmt_set_wait_hooks(aem_vmt *t, void *(*before)(void), void (*after)(void *));

/* ---- testing ------------------------------------------------------------------------------ */

/* Start an operation — allocating arg bytes, or (free_op) freeing the block at
 * offset arg — and after `writes` journaled metadata writes (0: right after
 * taking the lock) write one byte to notify_fd and sleep forever, holding the
 * lock: a test kills the process there.  VZONE only; returns only on error. */
int aem_vmt_debug_hang(aem_vmt *t, int free_op, uint64_t arg, unsigned writes, int notify_fd);

#endif
