/* http_parse.h — a strict one-pass parser of simple HTTP/1.1 request heads.
 *
 * It understands only what the native fast path answers by itself:
 *
 *   ("GET" | "HEAD") SP origin-form SP "HTTP/1.1" CRLF
 *   *( token ":" OWS field-value CRLF )
 *   CRLF
 *
 * with exactly one valid Host field, at most one Connection field whose value is
 * "close" or "keep-alive" (any case), and no Content-Length, Transfer-Encoding,
 * Expect or Upgrade field.  Anything else — incomplete, malformed,
 * over a limit, or merely unusual — is refused, and the caller hands the bytes
 * to the full parser (httptools), which decides what they mean.  It never
 * accepts what the full path would reject; it may refuse what it accepts.
 * No allocation, no Python: fuzzed alone (tests/test_http_fast_fuzz.py).
 */
#ifndef AEM_HTTP_PARSE_H
#define AEM_HTTP_PARSE_H

#include <stddef.h>

enum { AEM_HTTP_GET = 1, AEM_HTTP_HEAD = 2 };

/* Request flags. */
#define AEM_HTTP_CONDITIONAL 1u   /* an If-* or Range field: not for the file cache */
#define AEM_HTTP_CANONICAL 2u     /* the target is a plain path: [A-Za-z0-9._~-/], no query,
                                     no empty, "." or ".." segment (one spelling per file) */
#define AEM_HTTP_CLOSE 4u         /* "Connection: close": the connection ends with the answer */

typedef struct {
    const char *name, *value;
    size_t name_len, value_len;
} aem_http_field;

typedef struct {
    int method;               /* AEM_HTTP_GET or AEM_HTTP_HEAD */
    unsigned flags;
    const char *target;
    size_t target_len;
    size_t head_len;          /* bytes of the head, request line to the empty line */
    int nfields;
} aem_http_req;

typedef struct {
    size_t max_target;        /* Limits.max_request_line */
    size_t max_field_bytes;   /* Limits.max_header_size, counted as the full path counts */
    int max_fields;           /* Limits.max_headers; fields[] holds that many */
} aem_http_limits;

/* Parse the head at the start of buf[0..len).  0: a simple request, described in *req
 * and fields[0..req->nfields); -EAGAIN: the head is not complete yet; -EINVAL: not a
 * simple request (malformed, unusual or over a limit). */
int aem_http_parse(const char *buf, size_t len, const aem_http_limits *lim, aem_http_req *req,
                   aem_http_field *fields);

#endif
