/* handoff.h — the native capsule hand-off: a fixed binary record per event.
 *
 * The parent encodes an event of a common kind into one record (handoff_encode)
 * and sends it on the capsule's SOCK_SEQPACKET socket with its fd, if any, in
 * SCM_RIGHTS (handoff_send); the capsule receives it (handoff_recv) and the
 * parser (aem_handoff_parse) rebuilds a native event object from it.  Anything
 * else (other kinds, payloads of other types, handlers the template does not
 * know) keeps the pickled path: the two are told apart by the record's magic.
 *
 * A record, native byte order (both ends are the same machine):
 *     aem_ho_header, then data_len bytes (Read data, a bytes payload, a name/error text)
 */
#ifndef AEM_HANDOFF_H
#define AEM_HANDOFF_H

#include "pyaem.h"

#define AEM_HO_MAGIC 0x484d4541u /* "AEMH" */
#define AEM_HO_VERSION 1
#define AEM_HO_MAX_DATA (60 * 1024) /* larger data keeps the pickled path (memfd) */

enum { AEM_HO_RUN = 1, AEM_HO_KEEP = 2 };

/* flags: what the optional fields hold */
enum {
    AEM_HO_P_INT = 1,      /* USER: payload is the int i0 */
    AEM_HO_P_BYTES = 2,    /* USER: payload is the data bytes */
    AEM_HO_HAS_FD = 4,     /* one fd travels with the record */
    AEM_HO_RC = 8,         /* CHILD: returncode is i1 (else None) */
    AEM_HO_JOB = 16,       /* CHILD: job is i2 (else None) */
    AEM_HO_TEXT = 32,      /* CHILD: error / FILE: name is the data, UTF-8 (else None) */
};

typedef struct {
    uint32_t magic;
    uint8_t version;
    uint8_t op;       /* AEM_HO_RUN, AEM_HO_KEEP */
    uint8_t kind;     /* AEM_K_* */
    uint8_t flags;    /* AEM_HO_* */
    uint32_t data_len;
    uint32_t reserved;
    uint64_t eid;
    int64_t time_ns;
    uint64_t a, b;
    int64_t i0, i1, i2;
} aem_ho_header;

/* Parse one received record (len bytes at buf; nfds fds came with it) into
 * (op, eid, event), taking the event's source from the dict sources (eid ->
 * source) when it is there.  On success the event owns the fd it uses; on
 * error (ValueError for a malformed record) nothing was taken. */
PyObject *aem_handoff_parse(const char *buf, size_t len, const int *fds, int nfds, PyObject *sources);

/* The engine's delivery of an EVF_CAPSULE occurrence: when it is a native record (its
 * fd, if any, in SCM_RIGHTS) and nothing waits in the pool, hand it straight to the
 * newest idle capsule of the pool's table (pool None: the default pool's) for a
 * registration the capsules' template knows, if the reserve allows; or, for an
 * EVF_KEEPALIVE registration, to its attached capsule.  A socket sent (Accept's conn)
 * is closed in the parent.  1: sent; 0: not taken (the spawn hook's Python path);
 * -1: an exception is set. */
int aem_handoff_deliver(PyObject *pool, uint64_t eid, int flags, int priority, EventObject *ev);

int aem_handoff_init(PyObject *module);

/* The executor's answers, parent side (calls.c): call_recv, wait_readable. */
int aem_calls_init(PyObject *module);

/* Poll fd for input without sleeping, sched_yield() between two polls, for up to spin_us
 * µs (call it without the GIL): >0 readable, 0 not within that time, <0 an error (errno). */
int aem_spin_readable(int fd, int spin_us);

#endif
