/* http_parse.c — the strict one-pass head parser of the fast path (see http_parse.h). */
#include "http_parse.h"

#include <errno.h>
#include <string.h>

/* Character classes, one bit each. */
enum {
    C_TOKEN = 1,    /* tchar (RFC 9110 5.6.2) */
    C_TARGET = 2,   /* what origin-form may hold here: pchar, "/", "?" (no "#", no controls) */
    C_PATH = 4,     /* a canonical path: ALPHA DIGIT "-" "." "_" "~" "/" */
    C_VCHAR = 8,    /* a field value byte: VCHAR, SP, HTAB (no obs-text) */
    C_REGNAME = 16, /* Host reg-name: unreserved / sub-delims (no "%") */
    C_HEX = 32,
};

static unsigned char cls[256];

static void init_classes(void) {
    for (int c = 0; c < 256; c++) {
        unsigned char k = 0;
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        if (alnum || (c && strchr("!#$%&'*+-.^_`|~", c))) k |= C_TOKEN;
        if (alnum || (c && strchr("-._~!$&'()*+,;=:@/?%", c))) k |= C_TARGET;
        if (alnum || (c && strchr("-._~/", c))) k |= C_PATH;
        if ((c >= 0x20 && c <= 0x7e) || c == '\t') k |= C_VCHAR;
        if (alnum || (c && strchr("-._~!$&'()*+,;=", c))) k |= C_REGNAME;
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')) k |= C_HEX;
        cls[c] = k;
    }
}

#define IS(c, k) (cls[(unsigned char)(c)] & (k))

static int lower_eq(const char *s, size_t n, const char *lit, size_t litn) {
    if (n != litn) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c + 32);
        if (c != lit[i]) return 0;
    }
    return 1;
}

#define NAME_IS(f, lit) lower_eq((f)->name, (f)->name_len, lit, sizeof(lit) - 1)
#define VALUE_IS(f, lit) lower_eq((f)->value, (f)->value_len, lit, sizeof(lit) - 1)

/* Host = uri-host [ ":" port ], uri-host a reg-name or an IPv6 literal, never empty. */
static int valid_host(const char *v, size_t n) {
    size_t i = 0;
    if (n && v[0] == '[') {
        for (i = 1; i < n && v[i] != ']'; i++)
            if (!(IS(v[i], C_HEX) || v[i] == ':' || v[i] == '.')) return 0;
        if (i >= n || i == 1) return 0;
        i++;
    } else {
        while (i < n && IS(v[i], C_REGNAME)) i++;
        if (i == 0) return 0;
    }
    if (i == n) return 1;
    if (v[i] != ':') return 0;
    for (i++; i < n; i++)
        if (v[i] < '0' || v[i] > '9') return 0;
    return 1;
}

/* A canonical path: every segment but the last non-empty, none "." or ".." . */
static int canonical(const char *t, size_t n) {
    size_t seg = 1;  /* start of the current segment */
    for (size_t i = 1; i <= n; i++) {
        if (i < n && t[i] != '/') {
            if (!IS(t[i], C_PATH)) return 0;
            continue;
        }
        size_t len = i - seg;
        if (len == 0 && i < n) return 0;                        /* "//" */
        if (len == 1 && t[seg] == '.') return 0;                 /* "/./" */
        if (len == 2 && t[seg] == '.' && t[seg + 1] == '.') return 0;
        seg = i + 1;
    }
    return 1;
}

int aem_http_parse(const char *buf, size_t len, const aem_http_limits *lim, aem_http_req *req,
                   aem_http_field *fields) {
    if (!cls['a']) init_classes();
    const char *p = buf, *end = buf + len;
    /* the request line */
    if (len >= 4 && memcmp(p, "GET ", 4) == 0) {
        req->method = AEM_HTTP_GET;
        p += 4;
    } else if (len >= 5 && memcmp(p, "HEAD ", 5) == 0) {
        req->method = AEM_HTTP_HEAD;
        p += 5;
    } else {
        return len < 5 && memcmp(p, "HEAD ", len) == 0 ? -EAGAIN : -EINVAL;
    }
    req->target = p;
    if (p == end) return -EAGAIN;
    if (*p != '/') return -EINVAL;
    while (p < end && IS(*p, C_TARGET)) {
        if (*p == '%') {  /* a percent sign opens two hex digits */
            if (end - p < 3) return -EAGAIN;
            if (!IS(p[1], C_HEX) || !IS(p[2], C_HEX)) return -EINVAL;
            p += 2;
        }
        p++;
    }
    req->target_len = (size_t)(p - req->target);
    if (req->target_len > lim->max_target) return -EINVAL;
    if (end - p < 11) return memcmp(p, " HTTP/1.1\r\n", (size_t)(end - p)) == 0 ? -EAGAIN : -EINVAL;
    if (memcmp(p, " HTTP/1.1\r\n", 11) != 0) return -EINVAL;
    p += 11;
    req->flags = canonical(req->target, req->target_len) ? AEM_HTTP_CANONICAL : 0;
    /* the fields */
    int n = 0, hosts = 0, connections = 0;
    size_t field_bytes = 0;
    for (;;) {
        if (p == end) return -EAGAIN;
        if (*p == '\r') {
            if (p + 1 == end) return -EAGAIN;
            if (p[1] != '\n') return -EINVAL;
            p += 2;
            break;
        }
        if (n >= lim->max_fields) return -EINVAL;
        aem_http_field *f = &fields[n];
        f->name = p;
        while (p < end && IS(*p, C_TOKEN)) p++;
        if (p == end) return -EAGAIN;
        f->name_len = (size_t)(p - f->name);
        if (f->name_len == 0 || *p != ':') return -EINVAL;
        p++;
        while (p < end && (*p == ' ' || *p == '\t')) p++;
        f->value = p;
        while (p < end && IS(*p, C_VCHAR)) p++;
        if (end - p < 2) return p < end && *p != '\r' ? -EINVAL : -EAGAIN;
        if (p[0] != '\r' || p[1] != '\n') return -EINVAL;
        f->value_len = (size_t)(p - f->value);
        if (f->value_len && (p[-1] == ' ' || p[-1] == '\t')) return -EINVAL;  /* trailing OWS */
        p += 2;
        field_bytes += f->name_len + f->value_len + 4;
        if (field_bytes > lim->max_field_bytes) return -EINVAL;
        n++;
        /* the fields that change the framing or the connection: the full path's */
        switch (f->name_len) {
        case 4:
            if (NAME_IS(f, "host")) {
                if (++hosts > 1 || !valid_host(f->value, f->value_len)) return -EINVAL;
            }
            break;
        case 5:
            if (NAME_IS(f, "range")) req->flags |= AEM_HTTP_CONDITIONAL;
            break;
        case 6:
            if (NAME_IS(f, "expect")) return -EINVAL;
            break;
        case 7:
            if (NAME_IS(f, "upgrade")) return -EINVAL;
            break;
        case 10:
            if (NAME_IS(f, "connection")) {
                /* one token, close or keep-alive (a list, or another option: the full path's) */
                if (++connections > 1) return -EINVAL;
                if (VALUE_IS(f, "close")) req->flags |= AEM_HTTP_CLOSE;
                else if (!VALUE_IS(f, "keep-alive")) return -EINVAL;
            }
            break;
        case 14:
            if (NAME_IS(f, "content-length")) return -EINVAL;
            break;
        case 17:
            if (NAME_IS(f, "transfer-encoding")) return -EINVAL;
            break;
        default:
            break;
        }
        if (f->name_len >= 3 && (f->name[0] == 'i' || f->name[0] == 'I') &&
            (f->name[1] == 'f' || f->name[1] == 'F') && f->name[2] == '-')
            req->flags |= AEM_HTTP_CONDITIONAL;
    }
    if (hosts != 1) return -EINVAL;
    req->nfields = n;
    req->head_len = (size_t)(p - buf);
    return 0;
}
