/* heap.h — the engine's one binary heap, used by the timers (timers.c: a min-heap on
 * (deadline, start order)) and by the pending queue (engine.c: on (priority desc,
 * arrival asc)), and by aem.EventLoop's timers (loop.c: on (when, scheduling order)).
 *
 * AEM_HEAP_DEFINE(name, T, BEFORE, PLACED) defines static inline functions over an
 * array of T (no function pointers on the hot path):
 *
 *   name##_grow(&array, &cap, len)        room for one more element: 0 or -ENOMEM
 *   name##_sift_up(ctx, array, i, x)      put x at index i, moved up as far as it goes
 *   name##_sift_down(ctx, array, n, i, x) put x at index i of n, moved down as far as it goes
 *   name##_remove_at(ctx, array, &n, i)   remove the element at index i
 *
 * BEFORE(const T *a, const T *b) is the order (the root is before all others);
 * PLACED(ctx, i, const T *x) hears of every element stored at index i (the timers keep
 * their index in their registration, for removal in O(log n)).  Plain C, no Python.
 */
#ifndef AEM_HEAP_H
#define AEM_HEAP_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#define AEM_HEAP_FIRST_CAP 64u

#define AEM_HEAP_DEFINE(name, T, BEFORE, PLACED)                                          \
    static inline int name##_grow(T **array, uint32_t *cap, uint32_t len) {              \
        if (len < *cap) return 0;                                                        \
        uint32_t ncap = *cap ? *cap * 2 : AEM_HEAP_FIRST_CAP;                            \
        T *a = realloc(*array, sizeof(T) * ncap);                                        \
        if (!a) return -ENOMEM;                                                          \
        *array = a;                                                                      \
        *cap = ncap;                                                                     \
        return 0;                                                                        \
    }                                                                                    \
    static inline void name##_place(void *ctx, T *h, uint32_t i, const T *x) {           \
        h[i] = *x;                                                                       \
        PLACED(ctx, i, x);                                                               \
    }                                                                                    \
    static inline void name##_sift_up(void *ctx, T *h, uint32_t i, T x) {                \
        while (i > 0) {                                                                  \
            uint32_t parent = (i - 1) / 2;                                               \
            if (!BEFORE(&x, &h[parent])) break;                                          \
            name##_place(ctx, h, i, &h[parent]);                                         \
            i = parent;                                                                  \
        }                                                                                \
        name##_place(ctx, h, i, &x);                                                     \
    }                                                                                    \
    static inline void name##_sift_down(void *ctx, T *h, uint32_t n, uint32_t i, T x) {  \
        for (;;) {                                                                       \
            uint32_t c = 2 * i + 1;                                                      \
            if (c >= n) break;                                                           \
            if (c + 1 < n && BEFORE(&h[c + 1], &h[c])) c++;                              \
            if (!BEFORE(&h[c], &x)) break;                                               \
            name##_place(ctx, h, i, &h[c]);                                              \
            i = c;                                                                       \
        }                                                                                \
        name##_place(ctx, h, i, &x);                                                     \
    }                                                                                    \
    static inline void name##_remove_at(void *ctx, T *h, uint32_t *n, uint32_t i) {      \
        T last = h[--*n];                                                                \
        if (i == *n) return;                                                             \
        if (i > 0 && BEFORE(&last, &h[(i - 1) / 2])) name##_sift_up(ctx, h, i, last);    \
        else name##_sift_down(ctx, h, *n, i, last);                                      \
    }

#define AEM_HEAP_NOT_TRACKED(ctx, i, x) ((void)(ctx), (void)(i), (void)(x))

#endif
