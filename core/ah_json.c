/* Implementation of the string buffer and JSON writers declared in ah_json.h. */
#include "ah_json.h"

#include "ah_common.h"
#include "ah_redact.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ah_buf_init(ah_buf_t *b)
{
    memset(b, 0, sizeof(*b));
}

void ah_buf_free(ah_buf_t *b)
{
    free(b->data);
    ah_buf_init(b);
}

bool ah_buf_ok(const ah_buf_t *b)
{
    return !b->failed;
}

static bool buf_reserve(ah_buf_t *b, size_t extra)
{
    if (b->failed) {
        return false;
    }
    if (b->len + extra + 1 <= b->cap) {
        return true;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) {
        cap *= 2;
    }
    char *data = realloc(b->data, cap);
    if (data == NULL) {
        b->failed = true;
        return false;
    }
    b->data = data;
    b->cap = cap;
    return true;
}

void ah_buf_append(ah_buf_t *b, const char *s, size_t n)
{
    if (!buf_reserve(b, n)) {
        return;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void ah_buf_puts(ah_buf_t *b, const char *s)
{
    ah_buf_append(b, s, strlen(s));
}

void ah_buf_printf(ah_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = true;
        return;
    }
    if ((size_t)n < sizeof(small)) {
        ah_buf_append(b, small, (size_t)n);
        return;
    }
    if (!buf_reserve(b, (size_t)n)) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

char *ah_buf_take(ah_buf_t *b, size_t *len)
{
    if (b->failed) {
        ah_buf_free(b);
        return NULL;
    }
    if (b->data == NULL) {
        ah_buf_append(b, "", 0);
        if (b->failed) {
            return NULL;
        }
        /* buf_reserve allocated at least one byte */
    }
    char *data = b->data;
    if (len != NULL) {
        *len = b->len;
    }
    ah_buf_init(b);
    return data;
}

static void json_key(ah_buf_t *b, const char *key)
{
    if (b->need_comma) {
        ah_buf_append(b, ",", 1);
    }
    if (key != NULL) {
        ah_json_escape(b, key, strlen(key));
        ah_buf_append(b, ":", 1);
    }
    b->need_comma = true;
}

void ah_json_open(ah_buf_t *b)
{
    json_key(b, NULL);
    ah_buf_append(b, "{", 1);
    b->need_comma = false;
}

void ah_json_close(ah_buf_t *b)
{
    ah_buf_append(b, "}", 1);
    b->need_comma = true;
}

void ah_json_open_array(ah_buf_t *b, const char *key)
{
    json_key(b, key);
    ah_buf_append(b, "[", 1);
    b->need_comma = false;
}

void ah_json_close_array(ah_buf_t *b)
{
    ah_buf_append(b, "]", 1);
    b->need_comma = true;
}

void ah_json_open_object(ah_buf_t *b, const char *key)
{
    json_key(b, key);
    ah_buf_append(b, "{", 1);
    b->need_comma = false;
}

void ah_json_str(ah_buf_t *b, const char *key, const char *value)
{
    json_key(b, key);
    if (value == NULL) {
        ah_buf_append(b, "null", 4);
    } else if (!ah_redact_needed(value)) {
        ah_json_escape(b, value, strlen(value));
    } else {
        char *shown = ah_redact_dup(value);
        if (shown == NULL) {
            b->failed = true;
            return;
        }
        ah_json_escape(b, shown, strlen(shown));
        free(shown);
    }
}

void ah_json_int(ah_buf_t *b, const char *key, int64_t value)
{
    json_key(b, key);
    ah_buf_printf(b, "%lld", (long long)value);
}

void ah_json_num(ah_buf_t *b, const char *key, double value)
{
    json_key(b, key);
    if (!isfinite(value)) {
        ah_buf_append(b, "null", 4);
        return;
    }
    /* The shortest of %.15g / %.17g that reads back as the same double: 0.1 stays "0.1" rather
     * than %.17g's "0.10000000000000001". */
    char text[40];
    snprintf(text, sizeof(text), "%.15g", value);
    if (strtod(text, NULL) != value) {
        snprintf(text, sizeof(text), "%.17g", value);
    }
    ah_buf_puts(b, text);
}

void ah_json_bool(ah_buf_t *b, const char *key, bool value)
{
    json_key(b, key);
    ah_buf_puts(b, value ? "true" : "false");
}

void ah_json_null(ah_buf_t *b, const char *key)
{
    json_key(b, key);
    ah_buf_append(b, "null", 4);
}

void ah_json_escape(ah_buf_t *b, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    ah_buf_append(b, "\"", 1);
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            ah_buf_append(b, esc, 2);
            i++;
        } else if (c == '\n') {
            ah_buf_append(b, "\\n", 2);
            i++;
        } else if (c == '\r') {
            ah_buf_append(b, "\\r", 2);
            i++;
        } else if (c == '\t') {
            ah_buf_append(b, "\\t", 2);
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            ah_buf_printf(b, "\\u%04x", c);
            i++;
        } else if (c < 0x80) {
            size_t start = i;
            while (i < n && s[i] >= 0x20 && s[i] < 0x7F && s[i] != '"' && s[i] != '\\') {
                i++;
            }
            ah_buf_append(b, str + start, i - start);
        } else {
            size_t len = ah_utf8_seq_len(s + i, n - i);
            if (len == 0) {
                ah_buf_append(b, "\xEF\xBF\xBD", 3);
                i++;
            } else {
                ah_buf_append(b, str + i, len);
                i += len;
            }
        }
    }
    ah_buf_append(b, "\"", 1);
}
