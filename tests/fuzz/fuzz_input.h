/* Shared by the fuzz targets that read their input as a program: a cursor over the fuzzer's
 * bytes that reads past the end as zeros, so every input is a whole program. Header-only. */
#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *p;
    size_t left;
} input_t;

/* The next byte, 0 past the end. */
static inline unsigned next_byte(input_t *in)
{
    if (in->left == 0) {
        return 0;
    }
    in->left--;
    return *in->p++;
}

/* The next 8 bytes (zero-padded). */
static inline uint64_t next_u64(input_t *in)
{
    uint64_t v = 0;
    size_t n = in->left < 8 ? in->left : 8;
    memcpy(&v, in->p, n);
    in->p += n;
    in->left -= n;
    return v;
}

#endif
