/* Shared by the fuzz targets: a strict UTF-8 decoder (by code point ranges, independent of
 * core/ah_common.c) and a strict RFC 8259 JSON validator. Header-only, static functions. */
#ifndef FUZZ_JSON_CHECK_H
#define FUZZ_JSON_CHECK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Decodes one scalar value at s (n bytes left) by its code point ranges. Returns its length, or
 * 0 when the byte at s does not start a valid sequence. */
static inline size_t utf8_decode(const unsigned char *s, size_t n)
{
    static const uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
    size_t len;
    uint32_t cp;
    if (s[0] < 0x80) {
        return 1;
    } else if ((s[0] >> 5) == 0x6) {
        len = 2;
        cp = s[0] & 0x1F;
    } else if ((s[0] >> 4) == 0xE) {
        len = 3;
        cp = s[0] & 0x0F;
    } else if ((s[0] >> 3) == 0x1E) {
        len = 4;
        cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n) {
        return 0;
    }
    for (size_t i = 1; i < len; i++) {
        if ((s[i] >> 6) != 0x2) {
            return 0;
        }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min_for_len[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        return 0;
    }
    return len;
}

/* ---- a strict RFC 8259 validator --------------------------------------------------------- */

static inline const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static inline int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static inline int is_hex(char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static inline const char *valid_string(const char *p, const char *end)
{
    p++; /* the opening quote */
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            return p + 1;
        }
        if (c < 0x20) {
            return NULL;
        }
        if (c == '\\') {
            if (p + 1 >= end) {
                return NULL;
            }
            char e = p[1];
            if (e == 'u') {
                if (end - p < 6 || !is_hex(p[2]) || !is_hex(p[3]) || !is_hex(p[4]) ||
                    !is_hex(p[5])) {
                    return NULL;
                }
                p += 6;
            } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
                p += 2;
            } else {
                return NULL;
            }
            continue;
        }
        size_t len = utf8_decode((const unsigned char *)p, (size_t)(end - p));
        if (len == 0) {
            return NULL;
        }
        p += len;
    }
    return NULL;
}

static inline const char *valid_number(const char *p, const char *end)
{
    if (p < end && *p == '-') {
        p++;
    }
    if (p < end && *p == '0') {
        p++;
    } else if (p < end && is_digit(*p)) {
        while (p < end && is_digit(*p)) {
            p++;
        }
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || !is_digit(*p)) {
            return NULL;
        }
        while (p < end && is_digit(*p)) {
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        if (p >= end || !is_digit(*p)) {
            return NULL;
        }
        while (p < end && is_digit(*p)) {
            p++;
        }
    }
    return p;
}

static inline const char *valid_value(const char *p, const char *end);

static inline const char *valid_container(const char *p, const char *end, char close, int object)
{
    p = skip_ws(p + 1, end);
    if (p < end && *p == close) {
        return p + 1;
    }
    for (;;) {
        if (object) {
            if (p >= end || *p != '"' || (p = valid_string(p, end)) == NULL) {
                return NULL;
            }
            p = skip_ws(p, end);
            if (p >= end || *p != ':') {
                return NULL;
            }
            p++;
        }
        if ((p = valid_value(p, end)) == NULL) {
            return NULL;
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        return p < end && *p == close ? p + 1 : NULL;
    }
}

static inline const char *valid_value(const char *p, const char *end)
{
    p = skip_ws(p, end);
    if (p >= end) {
        return NULL;
    }
    switch (*p) {
    case '{':
        return valid_container(p, end, '}', 1);
    case '[':
        return valid_container(p, end, ']', 0);
    case '"':
        return valid_string(p, end);
    case 't':
        return end - p >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 : NULL;
    case 'f':
        return end - p >= 5 && memcmp(p, "false", 5) == 0 ? p + 5 : NULL;
    case 'n':
        return end - p >= 4 && memcmp(p, "null", 4) == 0 ? p + 4 : NULL;
    default:
        return valid_number(p, end);
    }
}

static inline int valid_json(const char *text, size_t len)
{
    const char *end = text + len;
    const char *p = valid_value(text, end);
    return p != NULL && skip_ws(p, end) == end;
}

#endif
