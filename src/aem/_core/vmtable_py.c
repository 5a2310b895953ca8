/* vmtable_py.c — the Python face of the vmtable (the allocator is vmtable.c).
 *
 *   aem._core.VMTable   one pool; aem.VMTable (vmtable.py) subclasses it to add
 *                       the `shortage` event source, attach() and docs
 *   aem.Block           a block of a pool: buffer protocol (writable, contiguous,
 *                       len() = bytes requested), .offset, .size, .fallback,
 *                       free(), detach(), context manager
 *   aem.VMTableError    misuse (a ValueError)
 * (the C loops of `aem bench vmtable` are in vmtable_bench.c)
 *
 * Ownership of a block's memory:
 *   - A Block owns its allocation until free() (or vmt.free(block)), detach(),
 *     or its deallocation (a Block that goes away frees its memory, in the
 *     process that owns it; a VZONE block inherited by a forked child is only
 *     freed there explicitly).
 *   - free() refuses while memoryviews of the block are alive (the memory
 *     must not be reused under them); after free() the block exports nothing.
 *   - A block's memory is also checked on every export: a block freed through
 *     its offset or by another process cannot be read through its stale Block.
 *   - Offsets (alloc_offset/free_offset/view) are the object-free fast path:
 *     their lifetime is the caller's business; view() checks that the range
 *     lies inside one allocated block when it is made.
 * Exports and in-flight calls are counted: close() refuses while any remain.
 */
#define _GNU_SOURCE
#include "pyaem.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <structmember.h>
#include <string.h>
#include <unistd.h>

#include "vmtable.h"
#include "vmtable_py.h"

PyObject *AemVMTableError;
static PyTypeObject *VMTable_Type;
static PyTypeObject *Block_Type;
static PyObject *str_on_shortage;
static long page_size;

/* The calling process (refreshed in forked children). */
static pid_t cur_pid;
static void refresh_pid(void) { cur_pid = getpid(); }

/* ===================================================================================
 * Objects
 * =================================================================================== */

typedef struct {
    PyObject_HEAD
    aem_vmt *core;          /* NULL until initialised and once closed */
    char *base;             /* first byte of the pool */
    uint64_t size, max_block, id;
    uint32_t min_block;
    int zone;
    int fallback;           /* serve from the heap on shortage */
    pid_t creator;          /* the process that created the name (unlinks it at close) */
    int busy;               /* calls in progress that may release the GIL */
    int in_shortage;        /* delivering its shortage event: no nested delivery */
    Py_ssize_t exports;     /* live buffer exports of its blocks and views */
    uint64_t fallback_live, fallback_bytes;  /* this process's live heap blocks */
    uint64_t view_off, view_len;
    int view_pending;       /* view() is making a memoryview of the pool */
    PyObject *name;         /* str, or None */
    PyObject *weakreflist;
} VMTableObject;

enum { B_LIVE = 0, B_FREED = 1, B_DETACHED = 2 };

typedef struct {
    PyObject_HEAD
    VMTableObject *vmt;
    char *ptr;
    uint64_t offset;        /* in the pool; unused for a fallback block */
    uint64_t size;          /* granted */
    Py_ssize_t len;         /* requested */
    uint32_t gen;
    pid_t pid;              /* the owning process: deallocation frees only there */
    uint8_t state;          /* B_* */
    uint8_t fallback;       /* heap memory, not the pool */
    int exports;
} BlockObject;

/* ===================================================================================
 * Helpers
 * =================================================================================== */

/* "64.0 MiB" */
static void human(char *buf, size_t cap, uint64_t n) {
    static const char *units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    unsigned u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        u++;
    }
    if (u == 0) snprintf(buf, cap, "%llu bytes", (unsigned long long)n);
    else snprintf(buf, cap, "%.1f %s", v, units[u]);
}

/* "vmtable 'x' (VZONE, 64.0 MiB)" or "anonymous UZONE vmtable of 64.0 MiB" */
static void describe(VMTableObject *self, char *buf, size_t cap) {
    char sz[32];
    human(sz, sizeof sz, self->size);
    const char *zone = self->zone == AEM_VMT_VZONE ? "VZONE" : "UZONE";
    if (self->name && self->name != Py_None)
        snprintf(buf, cap, "vmtable '%s' (%s, %s)", PyUnicode_AsUTF8(self->name), zone, sz);
    else snprintf(buf, cap, "anonymous %s vmtable of %s", zone, sz);
}

static int check_open(VMTableObject *self) {
    if (self->core) return 0;
    PyErr_SetString(AemVMTableError, "this vmtable is closed");
    return -1;
}

static void *release_gil(void) { return PyEval_SaveThread(); }
static void acquire_gil(void *state) { PyEval_RestoreThread((PyThreadState *)state); }

/* A size argument: an int >= 0 (Python-level checks say more about 0). */
static int parse_size(PyObject *arg, const char *what, uint64_t *out) {
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow > 0) {
        *out = UINT64_MAX;
        return 0;
    }
    if (overflow < 0 || v < 0) {
        PyErr_Format(AemVMTableError, "%s must be >= 0, got %S", what, arg);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* An error of the core, as a Python exception. */
static void core_error(VMTableObject *self, int rc, const char *what) {
    if (rc == -ENOTRECOVERABLE) {
        PyErr_Format(AemVMTableError, "%s: the vmtable's lock is unrecoverable (a process died while "
                     "repairing it)", what);
        return;
    }
    errno = -rc;
    PyErr_SetFromErrno(PyExc_OSError);
}

/* ===================================================================================
 * Allocation: the pool, the shortage event, the heap fallback
 * =================================================================================== */

static int core_alloc(VMTableObject *self, uint64_t n, uint64_t *off, uint32_t *gen) {
    self->busy++;
    int rc = aem_vmt_alloc(self->core, n, off, gen);
    self->busy--;
    return rc;
}

static int core_free(VMTableObject *self, uint64_t off, uint32_t gen) {
    self->busy++;
    int rc = aem_vmt_free(self->core, off, gen);
    self->busy--;
    return rc;
}

/* Count a shortage or a fallback (may wait for the lock of a VZONE). */
static void note(VMTableObject *self, int shortage, int fallback) {
    self->busy++;
    aem_vmt_note(self->core, shortage, fallback);
    self->busy--;
}

static int check_request(VMTableObject *self, uint64_t n) {
    if (check_open(self) < 0) return -1;
    if (n == 0) {
        PyErr_SetString(AemVMTableError, "cannot allocate 0 bytes: a request must be at least 1 byte");
        return -1;
    }
    if (n > self->max_block) {
        char d[160], sz[32];
        describe(self, d, sizeof d);
        human(sz, sizeof sz, self->max_block);
        if (n > self->size)
            PyErr_Format(AemVMTableError, "cannot allocate %llu bytes from %s: larger than the whole pool",
                         (unsigned long long)n, d);
        else
            PyErr_Format(AemVMTableError, "cannot allocate %llu bytes from %s: its largest block is %s "
                         "(the pool is carved into power-of-two blocks)", (unsigned long long)n, d, sz);
        return -1;
    }
    return 0;
}

static void set_shortage_error(VMTableObject *self, uint64_t n, const char *why) {
    aem_vmt_stats st;
    char d[160], lf[32], fr[32], gr[32];
    describe(self, d, sizeof d);
    self->busy++;
    if (aem_vmt_get_stats(self->core, &st) < 0) memset(&st, 0, sizeof st);
    self->busy--;
    human(lf, sizeof lf, st.largest_free);
    human(fr, sizeof fr, st.free);
    human(gr, sizeof gr, aem_vmt_granted(self->core, n));
    PyErr_Format(PyExc_MemoryError, "%s: no free block for %llu bytes (a block of %s is needed; the "
                 "largest free block is %s, %s free in all)%s", d, (unsigned long long)n, gr, lf, fr, why);
}

/* Allocate n bytes from the pool; on shortage deliver the shortage event and
 * retry once.  0: off and gen set.  1: still no block (no exception set).
 * -1: an exception (misuse, a handler's BaseException, the lock). */
static int pool_alloc(VMTableObject *self, uint64_t n, uint64_t *off, uint32_t *gen) {
    if (check_request(self, n) < 0) return -1;
    int rc = core_alloc(self, n, off, gen);
    if (rc == 0) return 0;
    if (rc != -ENOMEM) {
        core_error(self, rc, "allocation");
        return -1;
    }
    note(self, 1, 0);
    if (self->in_shortage) return 1;  /* a shortage handler allocating: no nested delivery */
    self->in_shortage = 1;
    PyObject *size = PyLong_FromUnsignedLongLong(n);
    PyObject *res = size ? PyObject_CallMethodOneArg((PyObject *)self, str_on_shortage, size) : NULL;
    Py_XDECREF(size);
    self->in_shortage = 0;
    if (!res) return -1;
    Py_DECREF(res);
    if (check_open(self) < 0) return -1;  /* a handler closed it */
    rc = core_alloc(self, n, off, gen);
    if (rc == 0) return 0;
    if (rc != -ENOMEM) {
        core_error(self, rc, "allocation");
        return -1;
    }
    return 1;
}

/* Heap memory for a fallback block: page-aligned from a page up, like the pool's. */
static char *heap_alloc(uint64_t n) {
    if (n < (uint64_t)page_size) return malloc(n);
    void *p = NULL;
    return posix_memalign(&p, (size_t)page_size, n) == 0 ? p : NULL;
}

static BlockObject *block_free_list[64];
static int block_free_count;

static BlockObject *block_make(VMTableObject *vmt) {
    BlockObject *b;
    if (block_free_count) {
        b = block_free_list[--block_free_count];
        PyObject_Init((PyObject *)b, Block_Type);
    } else {
        b = PyObject_New(BlockObject, Block_Type);
        if (!b) return NULL;
    }
    b->vmt = (VMTableObject *)Py_NewRef(vmt);
    b->state = B_LIVE;
    b->fallback = 0;
    b->exports = 0;
    b->pid = cur_pid;
    return b;
}

/* A Block of n bytes: from the pool, or (fallback=True) from the heap. */
static BlockObject *alloc_block(VMTableObject *self, uint64_t n) {
    uint64_t off;
    uint32_t gen;
    int rc = pool_alloc(self, n, &off, &gen);
    if (rc < 0) return NULL;
    if (rc == 0) {
        BlockObject *b = block_make(self);
        if (!b) {
            core_free(self, off, gen);
            return NULL;
        }
        b->ptr = self->base + off;
        b->offset = off;
        b->size = aem_vmt_granted(self->core, n);
        b->len = (Py_ssize_t)n;
        b->gen = gen;
        return b;
    }
    if (!self->fallback) {
        set_shortage_error(self, n, " and fallback is off");
        return NULL;
    }
    char *p = heap_alloc(n);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    BlockObject *b = block_make(self);
    if (!b) {
        free(p);
        return NULL;
    }
    b->ptr = p;
    b->offset = UINT64_MAX;
    b->size = n;
    b->len = (Py_ssize_t)n;
    b->gen = 0;
    b->fallback = 1;
    self->fallback_live++;
    self->fallback_bytes += n;
    note(self, 0, 1);
    return b;
}

/* ===================================================================================
 * Freeing a block
 * =================================================================================== */

/* Return a block's memory.  quiet: from deallocation (no exception, no checks
 * that only matter to a caller).  0 ok, -1 exception. */
static int block_release(BlockObject *b, int quiet) {
    VMTableObject *vmt = b->vmt;
    if (b->state != B_LIVE) {
        if (quiet) return 0;
        PyErr_SetString(AemVMTableError, b->state == B_FREED
                            ? "double free: this block was already freed"
                            : "this block was detached: its memory is freed by offset "
                              "(vmt.free_offset or a Block from vmt.block_at)");
        return -1;
    }
    if (b->exports > 0) {
        if (quiet) return 0;
        PyErr_Format(AemVMTableError, "cannot free a block while %d buffer export(s) of it (memoryviews) "
                     "are alive: release them first (view.release() or del)", b->exports);
        return -1;
    }
    b->state = B_FREED;
    if (b->fallback) {
        free(b->ptr);
        vmt->fallback_live--;
        vmt->fallback_bytes -= b->size;
        return 0;
    }
    if (!vmt->core) return 0;  /* the pool is gone with its vmtable */
    int rc = core_free(vmt, b->offset, b->gen);
    if (rc == 0 || quiet) return 0;
    if (rc == -EALREADY || rc == -EINVAL || rc == -ESTALE) {
        PyErr_Format(AemVMTableError, "this block (offset %llu) was already freed: through its offset, "
                     "another Block for it, or another process sharing the vmtable",
                     (unsigned long long)b->offset);
        return -1;
    }
    core_error(vmt, rc, "free");
    return -1;
}

/* ===================================================================================
 * aem.Block
 * =================================================================================== */

static void block_dealloc(BlockObject *b) {
    if (b->state == B_LIVE && (b->pid == cur_pid || b->vmt->zone == AEM_VMT_UZONE || b->fallback)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        block_release(b, 1);
        PyErr_Restore(type, value, tb);
    }
    Py_CLEAR(b->vmt);
    PyTypeObject *tp = Py_TYPE(b);
    if (block_free_count < (int)(sizeof block_free_list / sizeof block_free_list[0]))
        block_free_list[block_free_count++] = b;
    else PyObject_Free(b);
    Py_DECREF(tp);
}

static int block_check_usable(BlockObject *b) {
    if (b->state == B_FREED) {
        PyErr_SetString(AemVMTableError, "use after free: this block was freed");
        return -1;
    }
    if (b->state == B_DETACHED) {
        PyErr_SetString(AemVMTableError, "this block was detached: rebuild it with vmt.block_at(offset)");
        return -1;
    }
    if (b->fallback) return 0;
    if (!b->vmt->core) {
        PyErr_SetString(AemVMTableError, "the vmtable of this block is closed");
        return -1;
    }
    if (!aem_vmt_valid(b->vmt->core, b->offset, b->gen)) {
        PyErr_Format(AemVMTableError, "use after free: the block at offset %llu was freed (through its "
                     "offset, or by another process sharing the vmtable)", (unsigned long long)b->offset);
        return -1;
    }
    return 0;
}

static int block_getbuffer(BlockObject *b, Py_buffer *view, int flags) {
    if (block_check_usable(b) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)b, b->ptr, b->len, 0, flags) < 0) return -1;
    b->exports++;
    b->vmt->exports++;
    return 0;
}

static void block_releasebuffer(BlockObject *b, Py_buffer *view) {
    b->exports--;
    b->vmt->exports--;
}

static Py_ssize_t block_length(BlockObject *b) { return b->len; }

static PyObject *block_free_method(BlockObject *b, PyObject *noargs) {
    if (block_release(b, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *block_detach(BlockObject *b, PyObject *noargs) {
    if (b->fallback) {
        PyErr_SetString(AemVMTableError, "a fallback block lives in this process's heap: it has no "
                        "offset to hand over");
        return NULL;
    }
    if (block_check_usable(b) < 0) return NULL;
    b->state = B_DETACHED;
    return PyLong_FromUnsignedLongLong(b->offset);
}

static PyObject *block_enter(BlockObject *b, PyObject *noargs) { return Py_NewRef(b); }

static PyObject *block_exit(BlockObject *b, PyObject *args) {
    if (b->state == B_LIVE && block_release(b, 0) < 0) return NULL;
    Py_RETURN_FALSE;
}

static PyObject *block_repr(BlockObject *b) {
    const char *st = b->state == B_FREED ? " freed" : b->state == B_DETACHED ? " detached" : "";
    if (b->fallback)
        return PyUnicode_FromFormat("<aem.Block fallback (heap) len=%zd%s>", b->len, st);
    return PyUnicode_FromFormat("<aem.Block offset=%llu size=%llu len=%zd%s>",
                                (unsigned long long)b->offset, (unsigned long long)b->size, b->len, st);
}

static PyObject *block_get_offset(BlockObject *b, void *c) {
    return b->fallback ? PyLong_FromLong(-1) : PyLong_FromUnsignedLongLong(b->offset);
}
static PyObject *block_get_size(BlockObject *b, void *c) { return PyLong_FromUnsignedLongLong(b->size); }
static PyObject *block_get_fallback(BlockObject *b, void *c) { return PyBool_FromLong(b->fallback); }
static PyObject *block_get_freed(BlockObject *b, void *c) { return PyBool_FromLong(b->state != B_LIVE); }
static PyObject *block_get_vmtable(BlockObject *b, void *c) { return Py_NewRef(b->vmt); }
static PyObject *block_get_gen(BlockObject *b, void *c) { return PyLong_FromUnsignedLong(b->gen); }

static PyMethodDef block_methods[] = {
    {"free", (PyCFunction)block_free_method, METH_NOARGS,
     "free()\n--\n\nReturn the block's memory to its vmtable (or to the heap for a fallback block).\n\n"
     "Raises aem.VMTableError on a second free, while memoryviews of the block are alive, or if "
     "the block was already freed through its offset or by another process."},
    {"detach", (PyCFunction)block_detach, METH_NOARGS,
     "detach()\n--\n\nGive up this Block's ownership and return its offset: the memory stays "
     "allocated (for another process, or vmt.block_at(offset) later) and this Block becomes "
     "unusable; it will not free the memory when it goes away."},
    {"__enter__", (PyCFunction)block_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)block_exit, METH_VARARGS, "Free the block if it is still allocated."},
    {NULL},
};

static PyGetSetDef block_getset[] = {
    {"offset", (getter)block_get_offset, NULL, "Offset of the block in its vmtable's pool (-1 for a "
     "fallback block, which lives in the heap).", NULL},
    {"size", (getter)block_get_size, NULL, "Bytes granted (a power of two times min_block); "
     "len(block) is the bytes requested, the length of its buffer.", NULL},
    {"fallback", (getter)block_get_fallback, NULL, "True if the vmtable was short and the block "
     "came from the heap.", NULL},
    {"freed", (getter)block_get_freed, NULL, "True once freed (or detached).", NULL},
    {"vmtable", (getter)block_get_vmtable, NULL, "The vmtable the block belongs to.", NULL},
    {"generation", (getter)block_get_gen, NULL, "The allocation's generation stamp (0 for fallback "
     "blocks): a stale Block of a reused offset has another.", NULL},
    {NULL},
};

static PyType_Slot block_slots[] = {
    {Py_tp_dealloc, block_dealloc},
    {Py_tp_repr, block_repr},
    {Py_tp_methods, block_methods},
    {Py_tp_getset, block_getset},
    {Py_sq_length, block_length},
    {Py_bf_getbuffer, block_getbuffer},
    {Py_bf_releasebuffer, block_releasebuffer},
    {Py_tp_doc, "A block of vmtable memory (made by VMTable.alloc, never directly).\n\n"
                "Supports the buffer protocol (writable, contiguous, len(block) bytes): "
                "memoryview(block), sock.recv_into(block), os.readv(fd, [block]), "
                "sock.sendmsg([block]).  Blocks of a page or more are page-aligned.  "
                "free() (or a with block) returns the memory; a Block that is "
                "deallocated while allocated frees it too."},
    {0, NULL},
};

static PyType_Spec block_spec = {
    .name = "aem.Block",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = block_slots,
};

/* ===================================================================================
 * aem._core.VMTable
 * =================================================================================== */

static int vmt_init(VMTableObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"size", "zone", "min_block", "fallback", "name", "_attach", NULL};
    PyObject *size_obj, *name = Py_None;
    int zone = AEM_VMT_UZONE, fallback = 1, attach = 0;
    long long min_block = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|iLpO$p:VMTable", kwlist, &size_obj, &zone,
                                     &min_block, &fallback, &name, &attach))
        return -1;
    if (self->core) {
        PyErr_SetString(AemVMTableError, "this vmtable is already initialised");
        return -1;
    }
    if (name != Py_None && !PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "name must be a str or None, not %.100s", Py_TYPE(name)->tp_name);
        return -1;
    }
    const char *cname = name == Py_None ? NULL : PyUnicode_AsUTF8(name);
    if (name != Py_None && !cname) return -1;
    aem_vmt *core = NULL;
    int rc;
    if (attach) {
        if (!cname) {
            PyErr_SetString(PyExc_ValueError, "attach needs the name of a VZONE vmtable");
            return -1;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = aem_vmt_attach(cname, &core);
        Py_END_ALLOW_THREADS
        if (rc == -ENOENT) {
            PyErr_Format(PyExc_FileNotFoundError, "no vmtable named %R (create it with "
                         "VMTable(size, zone=TBL_VZONE, name=...))", name);
            return -1;
        }
        if (rc == -EPROTO) {
            PyErr_Format(AemVMTableError, "the shared memory object %R is not an aem vmtable "
                         "(or its creator died while making it)", name);
            return -1;
        }
        if (rc == -EINVAL) {
            PyErr_Format(PyExc_ValueError, "bad vmtable name %R: a non-empty name without '/' "
                         "(a leading '/' is allowed)", name);
            return -1;
        }
    } else {
        uint64_t size;
        if (parse_size(size_obj, "size", &size) < 0) return -1;
        if (size == 0) {
            PyErr_SetString(PyExc_ValueError, "a vmtable's size must be at least 1 byte");
            return -1;
        }
        if (zone != AEM_VMT_UZONE && zone != AEM_VMT_VZONE) {
            PyErr_Format(PyExc_ValueError, "zone must be TBL_UZONE (0) or TBL_VZONE (1), got %d", zone);
            return -1;
        }
        if (min_block < AEM_VMT_MIN_BLOCK_MIN || min_block > (1ll << 30) || (min_block & (min_block - 1))) {
            PyErr_Format(PyExc_ValueError, "min_block must be a power of two from 16 to 2**30, got %lld",
                         min_block);
            return -1;
        }
        if (cname && zone != AEM_VMT_VZONE) {
            PyErr_SetString(PyExc_ValueError, "name= makes a named shared pool: use zone=TBL_VZONE");
            return -1;
        }
        aem_vmt_config cfg = {.size = size, .min_block = (uint32_t)min_block, .zone = zone, .name = cname};
        Py_BEGIN_ALLOW_THREADS
        rc = aem_vmt_create(&cfg, &core);
        Py_END_ALLOW_THREADS
        if (rc == -EEXIST) {
            PyErr_Format(PyExc_FileExistsError, "a vmtable named %R already exists: join it with "
                         "VMTable.attach(%R)", name, name);
            return -1;
        }
        if (rc == -E2BIG) {
            PyErr_Format(PyExc_ValueError, "a pool of %llu bytes has more than 2**32 blocks of "
                         "min_block=%lld bytes: raise min_block", (unsigned long long)size, min_block);
            return -1;
        }
        if (rc == -EINVAL && cname) {
            PyErr_Format(PyExc_ValueError, "bad vmtable name %R: a non-empty name without '/' "
                         "(a leading '/' is allowed)", name);
            return -1;
        }
        if (rc == -ENOMEM) {
            char sz[32];
            human(sz, sizeof sz, size);
            PyErr_Format(PyExc_MemoryError, "cannot map a vmtable pool of %s", sz);
            return -1;
        }
    }
    if (rc < 0) {
        errno = -rc;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return -1;
    }
    if (aem_vmt_zone(core) == AEM_VMT_VZONE) aem_vmt_set_wait_hooks(core, release_gil, acquire_gil);
    self->core = core;
    self->base = aem_vmt_base(core);
    self->size = aem_vmt_size(core);
    self->max_block = aem_vmt_max_block(core);
    self->min_block = aem_vmt_min_block(core);
    self->zone = aem_vmt_zone(core);
    self->id = aem_vmt_id(core);
    self->fallback = fallback;
    self->creator = cname && !attach ? cur_pid : 0;
    if (cname) {
        const char *canon = aem_vmt_name(core);
        Py_XSETREF(self->name, PyUnicode_FromString(canon[0] == '/' ? canon + 1 : canon));
        if (!self->name) return -1;
    } else {
        Py_XSETREF(self->name, Py_NewRef(Py_None));
    }
    return 0;
}

static int vmt_do_close(VMTableObject *self, int raise) {
    if (!self->core) return 0;
    if (self->exports > 0 || self->busy > 0) {
        if (raise) {
            if (self->busy > 0)
                PyErr_SetString(AemVMTableError, "cannot close a vmtable while another thread is "
                                "waiting for its lock");
            else
                PyErr_Format(AemVMTableError, "cannot close a vmtable while %zd buffer export(s) of its "
                             "blocks or views are alive (memoryviews): release them first", self->exports);
        }
        return -1;
    }
    aem_vmt *core = self->core;
    self->core = NULL;
    self->base = NULL;
    aem_vmt_destroy(core, self->creator && self->creator == cur_pid);
    return 0;
}

static void vmt_dealloc(VMTableObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    vmt_do_close(self, 0);
    Py_CLEAR(self->name);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *vmt_alloc(VMTableObject *self, PyObject *arg) {
    uint64_t n;
    if (parse_size(arg, "size", &n) < 0) return NULL;
    return (PyObject *)alloc_block(self, n);
}

static PyObject *vmt_free(VMTableObject *self, PyObject *arg) {
    if (Py_TYPE(arg) != Block_Type) {
        PyErr_Format(PyExc_TypeError, "free() takes an aem.Block, not %.100s (use free_offset for an "
                     "offset)", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    BlockObject *b = (BlockObject *)arg;
    if (b->vmt != self) {
        PyErr_SetString(AemVMTableError, "this block belongs to another vmtable");
        return NULL;
    }
    if (block_release(b, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *vmt_alloc_offset(VMTableObject *self, PyObject *arg) {
    uint64_t n, off;
    uint32_t gen;
    if (parse_size(arg, "size", &n) < 0) return NULL;
    int rc = pool_alloc(self, n, &off, &gen);
    if (rc < 0) return NULL;
    if (rc > 0) {
        set_shortage_error(self, n, " (offsets exist only in the pool: no heap fallback)");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(off);
}

static PyObject *vmt_free_offset(VMTableObject *self, PyObject *arg) {
    uint64_t off;
    if (parse_size(arg, "offset", &off) < 0 || check_open(self) < 0) return NULL;
    int rc = core_free(self, off, AEM_VMT_ANY_GEN);
    if (rc == 0) Py_RETURN_NONE;
    if (rc == -EALREADY)
        PyErr_Format(AemVMTableError, "double free: the block at offset %llu is already free",
                     (unsigned long long)off);
    else if (rc == -EINVAL)
        PyErr_Format(AemVMTableError, "offset %llu is not the start of an allocated block of this "
                     "vmtable (already freed and merged, or never returned by alloc)",
                     (unsigned long long)off);
    else core_error(self, rc, "free_offset");
    return NULL;
}

static PyObject *vmt_view(VMTableObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t off, n;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "view() takes 2 arguments (offset, size), got %zd", nargs);
        return NULL;
    }
    if (parse_size(args[0], "offset", &off) < 0 || parse_size(args[1], "size", &n) < 0 ||
        check_open(self) < 0)
        return NULL;
    aem_vmt_block blk;
    if (n == 0 || aem_vmt_find(self->core, off, n, &blk) < 0) {
        PyErr_Format(AemVMTableError, "bytes [%llu, %llu) of this vmtable are not inside one allocated "
                     "block", (unsigned long long)off, (unsigned long long)(off + n));
        return NULL;
    }
    self->view_off = off;
    self->view_len = n;
    self->view_pending = 1;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)self);
    self->view_pending = 0;
    return mv;
}

static int vmt_getbuffer(VMTableObject *self, Py_buffer *view, int flags) {
    if (!self->view_pending) {
        PyErr_SetString(PyExc_BufferError, "a vmtable exports memory only through its blocks and "
                        "view(offset, size)");
        view->obj = NULL;
        return -1;
    }
    if (check_open(self) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base + self->view_off, (Py_ssize_t)self->view_len,
                          0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void vmt_releasebuffer(VMTableObject *self, Py_buffer *view) { self->exports--; }

static PyObject *vmt_block_at(VMTableObject *self, PyObject *arg) {
    uint64_t off;
    if (parse_size(arg, "offset", &off) < 0 || check_open(self) < 0) return NULL;
    aem_vmt_block info;
    self->busy++;
    int rc = aem_vmt_lookup(self->core, off, &info);
    self->busy--;
    if (rc < 0) {
        if (rc == -EALREADY || rc == -EINVAL)
            PyErr_Format(AemVMTableError, "no allocated block starts at offset %llu of this vmtable",
                         (unsigned long long)off);
        else core_error(self, rc, "block_at");
        return NULL;
    }
    BlockObject *b = block_make(self);
    if (!b) return NULL;
    b->ptr = self->base + off;
    b->offset = off;
    b->size = info.size;
    b->len = (Py_ssize_t)info.requested;
    b->gen = info.gen;
    return (PyObject *)b;
}

static PyObject *vmt_stats(VMTableObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"drain", NULL};
    int drain = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:stats", kwlist, &drain)) return NULL;
    if (check_open(self) < 0) return NULL;
    aem_vmt_stats st;
    self->busy++;
    long drained = drain ? aem_vmt_drain(self->core) : 0;
    int rc = drained < 0 ? (int)drained : aem_vmt_get_stats(self->core, &st);
    self->busy--;
    if (rc < 0) {
        core_error(self, rc, "stats");
        return NULL;
    }
    PyObject *by_order = PyDict_New();
    if (!by_order) return NULL;
    uint64_t blocks = 0;
    for (uint32_t k = 0; k <= st.max_order; k++) {
        blocks += st.used_count[k];
        PyObject *entry = Py_BuildValue("{sIsIsI}", "free", st.free_count[k] + st.cache_count[k], "used",
                                        st.used_count[k], "cached", st.cache_count[k]);
        PyObject *key = PyLong_FromUnsignedLongLong((uint64_t)st.min_block << k);
        int bad = !entry || !key || PyDict_SetItem(by_order, key, entry) < 0;
        Py_XDECREF(entry);
        Py_XDECREF(key);
        if (bad) {
            Py_DECREF(by_order);
            return NULL;
        }
    }
    double internal = st.requested ? (double)st.used / (double)st.requested : 1.0;
    double external = st.free ? 1.0 - (double)st.largest_free / (double)st.free : 0.0;
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsNsKsKsKsKsKsKsKsKsKsKsdsdsssIsO}", "size", st.size, "used", st.used,
        "requested", st.requested, "free", st.free, "cached", st.cached, "largest_free", st.largest_free,
        "blocks", blocks, "by_order", by_order, "shortages", st.shortages, "fallbacks", st.fallbacks,
        "fallback_live", self->fallback_live, "fallback_bytes", self->fallback_bytes, "splits", st.splits,
        "merges", st.merges, "drains", st.drains, "releases", st.releases, "recoveries", st.recoveries,
        "max_block", self->max_block, "internal_fragmentation", internal, "external_fragmentation",
        external, "zone", self->zone == AEM_VMT_VZONE ? "VZONE" : "UZONE", "min_block", st.min_block,
        "name", self->name ? self->name : Py_None);
}

static void collect_violation(void *arg, const char *msg) {
    PyObject *list = arg, *s = PyUnicode_FromString(msg);
    if (!s || PyList_Append(list, s) < 0) PyErr_Clear();
    Py_XDECREF(s);
}

static PyObject *vmt_check(VMTableObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"full", NULL};
    int full = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:check", kwlist, &full)) return NULL;
    if (check_open(self) < 0) return NULL;
    PyObject *found = PyList_New(0);
    if (!found) return NULL;
    self->busy++;
    long n = aem_vmt_check(self->core, full ? AEM_VMT_CHECK_FULL : 0, collect_violation, found);
    self->busy--;
    if (n < 0) {
        Py_DECREF(found);
        core_error(self, (int)n, "check");
        return NULL;
    }
    if (n == 0) {
        Py_DECREF(found);
        Py_RETURN_NONE;
    }
    PyObject *sep = PyUnicode_FromString("\n  - ");
    PyObject *text = sep ? PyUnicode_Join(sep, found) : NULL;
    if (text) PyErr_Format(AemVMTableError, "vmtable check failed: %ld violation(s):\n  - %U", n, text);
    Py_XDECREF(sep);
    Py_XDECREF(text);
    Py_DECREF(found);
    return NULL;
}

static PyObject *vmt_close(VMTableObject *self, PyObject *noargs) {
    if (vmt_do_close(self, 1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *vmt_on_shortage(VMTableObject *self, PyObject *size) { Py_RETURN_NONE; }

static PyObject *vmt_granted(VMTableObject *self, PyObject *arg) {
    uint64_t n;
    if (parse_size(arg, "size", &n) < 0 || check_open(self) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(aem_vmt_granted(self->core, n));
}

/* _debug_hang(op, arg, writes, notify_fd): take the lock, begin `op` ("alloc" arg
 * bytes, or "free" the block at offset arg) and after `writes` journaled writes
 * notify and sleep forever, holding the lock (tests kill the process there).
 * Returns only on error. */
static PyObject *vmt_debug_hang(VMTableObject *self, PyObject *args) {
    const char *op;
    unsigned long long arg;
    unsigned int writes;
    int fd;
    if (!PyArg_ParseTuple(args, "sKIi:_debug_hang", &op, &arg, &writes, &fd) || check_open(self) < 0)
        return NULL;
    int free_op = !strcmp(op, "free");
    if (!free_op && strcmp(op, "alloc")) {
        PyErr_Format(PyExc_ValueError, "op must be 'alloc' or 'free', not %s", op);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = aem_vmt_debug_hang(self->core, free_op, arg, writes, fd);
    Py_END_ALLOW_THREADS
    errno = -rc;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *vmt_get_size(VMTableObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->size); }
static PyObject *vmt_get_min_block(VMTableObject *self, void *c) { return PyLong_FromUnsignedLong(self->min_block); }
static PyObject *vmt_get_max_block(VMTableObject *self, void *c) {
    return PyLong_FromUnsignedLongLong(self->max_block);
}
static PyObject *vmt_get_zone(VMTableObject *self, void *c) { return PyLong_FromLong(self->zone); }
static PyObject *vmt_get_name(VMTableObject *self, void *c) { return Py_NewRef(self->name ? self->name : Py_None); }
static PyObject *vmt_get_closed(VMTableObject *self, void *c) { return PyBool_FromLong(self->core == NULL); }
static PyObject *vmt_get_id(VMTableObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->id); }
static PyObject *vmt_get_fallback(VMTableObject *self, void *c) { return PyBool_FromLong(self->fallback); }
static int vmt_set_fallback(VMTableObject *self, PyObject *v, void *c) {
    int b = v ? PyObject_IsTrue(v) : -1;
    if (b < 0) {
        if (!v) PyErr_SetString(PyExc_AttributeError, "cannot delete fallback");
        return -1;
    }
    self->fallback = b;
    return 0;
}

static PyMethodDef vmt_methods[] = {
    {"alloc", (PyCFunction)vmt_alloc, METH_O,
     "alloc(size)\n--\n\n"
     "A new aem.Block of at least size bytes (len(block) == size; block.size is what was "
     "granted, a power of two times min_block).\n\n"
     "When no free block fits, the vmtable's shortage handlers run first and the request is "
     "retried once; then the block comes from the heap if fallback is on (block.fallback), "
     "else MemoryError naming the vmtable and the size.  Raises aem.VMTableError for a size "
     "of 0, a negative size, or one beyond the largest block.\n\n"
     ">>> with vmt.alloc(4096) as blk:\n...     n = sock.recv_into(blk)"},
    {"free", (PyCFunction)vmt_free, METH_O,
     "free(block)\n--\n\nFree a block of this vmtable (same as block.free()).\n\n"
     "Raises aem.VMTableError for a block of another vmtable, a second free, a block whose "
     "memoryviews are alive, or one freed meanwhile through its offset or by another process; "
     "TypeError for anything but an aem.Block."},
    {"alloc_offset", (PyCFunction)vmt_alloc_offset, METH_O,
     "alloc_offset(size)\n--\n\nAllocate at least size bytes and return the block's offset "
     "in the pool: the fast path, no object is made.\n\n"
     "The block stays allocated until free_offset(offset) (in any process sharing the pool). "
     "Shortage handlers run as for alloc(), but there is no heap fallback: MemoryError when "
     "still short.  aem.VMTableError for sizes as for alloc().\n\n"
     ">>> off = vmt.alloc_offset(100); vmt.view(off, 5)[:] = b'hello'; vmt.free_offset(off)"},
    {"free_offset", (PyCFunction)vmt_free_offset, METH_O,
     "free_offset(offset)\n--\n\nFree the allocated block that starts at offset (as "
     "returned by alloc_offset, Block.offset or Block.detach()).\n\n"
     "Raises aem.VMTableError if no allocated block starts there (a double free, an offset "
     "inside a block, beyond the pool).  An offset carries no identity: freeing an offset "
     "that another owner reallocated frees that owner's block; Blocks are checked."},
    {"view", (PyCFunction)(void (*)(void))vmt_view, METH_FASTCALL,
     "view(offset, size)\n--\n\nA writable memoryview of size bytes at offset.\n\n"
     "Raises aem.VMTableError unless [offset, offset + size) lies inside one allocated block "
     "(checked when the view is made; the view does not follow the block's later life, so "
     "keep the block allocated while you use it).  close() refuses while views are alive."},
    {"block_at", (PyCFunction)vmt_block_at, METH_O,
     "block_at(offset)\n--\n\nA Block owning the allocated block that starts at offset, "
     "e.g. one allocated by another process (len() is the size it was requested with).\n\n"
     "Raises aem.VMTableError if no allocated block starts there."},
    {"stats", (PyCFunction)(void (*)(void))vmt_stats, METH_VARARGS | METH_KEYWORDS,
     "stats(drain=True)\n--\n\nSizes and counters of the pool, as a dict (see aem.VMTable.stats)."},
    {"check", (PyCFunction)(void (*)(void))vmt_check, METH_VARARGS | METH_KEYWORDS,
     "check(full=True)\n--\n\nVerify every invariant of the allocator; raise "
     "aem.VMTableError listing the violations."},
    {"close", (PyCFunction)vmt_close, METH_NOARGS,
     "close()\n--\n\nUnmap the pool (idempotent).  The creator of a named VZONE also removes "
     "the name; other processes keep their mapping.  Blocks of a closed vmtable are dead.\n\n"
     "Raises aem.VMTableError while memoryviews of its blocks or views are alive, or while "
     "another thread waits for its lock."},
    {"granted", (PyCFunction)vmt_granted, METH_O,
     "granted(size)\n--\n\nThe bytes a request of size bytes is granted (0: it never can be)."},
    {"_on_shortage", (PyCFunction)vmt_on_shortage, METH_O, "Deliver the shortage event (subclasses)."},
    {"_debug_hang", (PyCFunction)vmt_debug_hang, METH_VARARGS, "Test only: die holding the lock."},
    {NULL},
};

static PyGetSetDef vmt_getset[] = {
    {"size", (getter)vmt_get_size, NULL, "Bytes in the pool.", NULL},
    {"min_block", (getter)vmt_get_min_block, NULL, "The smallest block, in bytes.", NULL},
    {"max_block", (getter)vmt_get_max_block, NULL, "The largest block the pool can hold.", NULL},
    {"zone", (getter)vmt_get_zone, NULL, "TBL_UZONE (0) or TBL_VZONE (1).", NULL},
    {"name", (getter)vmt_get_name, NULL, "The shared memory name of a named VZONE, else None.", NULL},
    {"closed", (getter)vmt_get_closed, NULL, "True once closed.", NULL},
    {"id", (getter)vmt_get_id, NULL, "A random 64-bit identity of the pool (same in every process).",
     NULL},
    {"fallback", (getter)vmt_get_fallback, (setter)vmt_set_fallback,
     "Serve requests from the heap when the pool is short (Block.fallback).", NULL},
    {NULL},
};

static PyMemberDef vmt_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(VMTableObject, weakreflist), READONLY, NULL},
    {NULL},
};

static PyType_Slot vmt_slots[] = {
    {Py_tp_init, vmt_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, vmt_dealloc},
    {Py_tp_methods, vmt_methods},
    {Py_tp_getset, vmt_getset},
    {Py_tp_members, vmt_members},
    {Py_bf_getbuffer, vmt_getbuffer},
    {Py_bf_releasebuffer, vmt_releasebuffer},
    {Py_tp_doc, "The C core of aem.VMTable (use aem.VMTable)."},
    {0, NULL},
};

static PyType_Spec vmt_spec = {
    .name = "aem._core.VMTable",
    .basicsize = sizeof(VMTableObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = vmt_slots,
};

/* ===================================================================================
 * The C API for the engine (vmtable_py.h)
 * =================================================================================== */

int aem_vmtable_check_type(PyObject *o) { return PyObject_TypeCheck(o, VMTable_Type); }

PyObject *aem_vmtable_copy_in(PyObject *vmt, const void *data, size_t n) {
    if (!aem_vmtable_check_type(vmt)) {
        PyErr_Format(PyExc_TypeError, "expected an aem.VMTable, got %.100s", Py_TYPE(vmt)->tp_name);
        return NULL;
    }
    BlockObject *b = alloc_block((VMTableObject *)vmt, (uint64_t)n);
    if (b) memcpy(b->ptr, data, n);
    return (PyObject *)b;
}

int aem_block_release(PyObject *block) {
    if (Py_TYPE(block) != Block_Type) {
        PyErr_Format(PyExc_TypeError, "expected an aem.Block, got %.100s", Py_TYPE(block)->tp_name);
        return -1;
    }
    BlockObject *b = (BlockObject *)block;
    if (b->state != B_LIVE || b->exports > 0) return 0;
    if (block_release(b, 0) == 0) return 0;
    if (PyErr_ExceptionMatches(AemVMTableError)) {  /* freed meanwhile by its offset or another process */
        PyErr_Clear();
        return 0;
    }
    return -1;
}

/* Test hooks for the C API of vmtable_py.h. */
static PyObject *py_vmt_copy_in(PyObject *module, PyObject *args) {
    PyObject *vmt;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*:_vmt_copy_in", &vmt, &data)) return NULL;
    PyObject *res = aem_vmtable_copy_in(vmt, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return res;
}

static PyObject *py_block_release(PyObject *module, PyObject *block) {
    if (aem_block_release(block) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef module_functions[] = {
    {"_vmt_copy_in", py_vmt_copy_in, METH_VARARGS, "Test hook: aem_vmtable_copy_in(vmt, data)."},
    {"_block_release", py_block_release, METH_O, "Test hook: aem_block_release(block)."},
    {NULL},
};

/* ===================================================================================
 * Module init (called from module.c)
 * =================================================================================== */

int aem_vmtable_module_init(PyObject *module) {
    static int atfork_done;
    refresh_pid();
    if (!atfork_done && pthread_atfork(NULL, NULL, refresh_pid) != 0) return -1;
    atfork_done = 1;
    page_size = sysconf(_SC_PAGESIZE);
    str_on_shortage = PyUnicode_InternFromString("_on_shortage");
    if (!str_on_shortage) return -1;
    AemVMTableError = PyErr_NewExceptionWithDoc(
        "aem.VMTableError", "Misuse of a vmtable or of one of its blocks (double free, use after "
        "free, a foreign block, a size of 0 or beyond the pool ...).", PyExc_ValueError, NULL);
    if (!AemVMTableError || PyModule_AddObjectRef(module, "VMTableError", AemVMTableError) < 0) return -1;
    Block_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &block_spec, NULL);
    if (!Block_Type || PyModule_AddObjectRef(module, "Block", (PyObject *)Block_Type) < 0) return -1;
    VMTable_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &vmt_spec, NULL);
    if (!VMTable_Type || PyModule_AddObjectRef(module, "VMTable", (PyObject *)VMTable_Type) < 0) return -1;
    if (PyModule_AddIntConstant(module, "TBL_UZONE", AEM_VMT_UZONE) < 0 ||
        PyModule_AddIntConstant(module, "TBL_VZONE", AEM_VMT_VZONE) < 0)
        return -1;
    return PyModule_AddFunctions(module, module_functions);
}
