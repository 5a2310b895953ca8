/* http_parse_fuzz.c — the C side of the fuzz target of the fast path's head parser.
 *
 * Built with clang -fsanitize=fuzzer-no-link,undefined together with
 * src/aem/_core/http_parse.c (tests/test_http_fast_fuzz.py does it) and driven by
 * atheris (tests/fuzz/fuzz_http_parse.py).  Checks the parser's own promises;
 * the Python side checks the verdicts against httptools.
 */
#include <stdlib.h>
#include <string.h>

#include "http_parse.h"

static void check(int ok) {
    if (!ok) abort();
}

/* Parse data under three sets of limits; the head length for the default limits,
 * -1 when refused. */
long aem_fuzz_http_parse(const char *data, size_t len) {
    static const aem_http_limits lims[3] = {{8192, 16384, 100}, {16, 64, 2}, {1, 1, 1}};
    aem_http_field fields[100];
    long verdict = -1;
    for (int k = 0; k < 3; k++) {
        /* a private copy, exactly len bytes: reading past the end is caught by ASan/UBSan */
        char *buf = malloc(len ? len : 1);
        check(buf != NULL);
        memcpy(buf, data, len);
        aem_http_req r;
        int rc = aem_http_parse(buf, len, &lims[k], &r, fields);
        check(rc == 0 || rc == -11 /* EAGAIN */ || rc == -22 /* EINVAL */);
        if (rc == 0) {
            check(r.head_len >= 18 && r.head_len <= len);
            check(memcmp(buf + r.head_len - 4, "\r\n\r\n", 4) == 0);
            check(r.target >= buf && r.target + r.target_len <= buf + r.head_len);
            check(r.target_len >= 1 && r.target_len <= lims[k].max_target && r.target[0] == '/');
            check(r.nfields >= 1 && r.nfields <= lims[k].max_fields);
            size_t bytes = 0;
            for (int i = 0; i < r.nfields; i++) {
                const aem_http_field *f = &fields[i];
                check(f->name >= buf && f->value + f->value_len <= buf + r.head_len);
                check(f->name_len >= 1 && memchr(f->value, '\r', f->value_len) == NULL);
                bytes += f->name_len + f->value_len + 4;
            }
            check(bytes <= lims[k].max_field_bytes);
            /* the same head alone parses the same; a prefix of it is never complete */
            aem_http_req r2;
            check(aem_http_parse(buf, r.head_len, &lims[k], &r2, fields) == 0 && r2.head_len == r.head_len);
            check(aem_http_parse(buf, r.head_len - 1, &lims[k], &r2, fields) == -11);
            if (k == 0) verdict = (long)r.head_len;
        }
        free(buf);
    }
    return verdict;
}
