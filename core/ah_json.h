/* A growable string buffer with JSON writers, used to build HTTP bodies and JSON log lines in a
 * fixed field order. Writers never fail visibly: on allocation failure the buffer is marked
 * failed and ah_buf_ok() returns false. The caller owns the buffer and frees it with
 * ah_buf_free(). Not thread-safe; one owner at a time. */
#ifndef AH_JSON_H
#define AH_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ah_buf_s {
    char *data; /* NUL-terminated when len > 0 */
    size_t len;
    size_t cap;
    bool failed;
    bool need_comma; /* internal: a value was written at the current nesting level */
} ah_buf_t;

void ah_buf_init(ah_buf_t *b);
void ah_buf_free(ah_buf_t *b);
bool ah_buf_ok(const ah_buf_t *b);
void ah_buf_append(ah_buf_t *b, const char *s, size_t n);
void ah_buf_puts(ah_buf_t *b, const char *s);
void ah_buf_printf(ah_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Hands the data to the caller (malloc'd, NUL-terminated) and resets the buffer. */
char *ah_buf_take(ah_buf_t *b, size_t *len);

/* JSON: objects/arrays with automatic commas. Keys are written as given (escaped). */
void ah_json_open(ah_buf_t *b);                         /* { */
void ah_json_close(ah_buf_t *b);                        /* } */
void ah_json_open_array(ah_buf_t *b, const char *key);  /* "key": [  (key NULL inside arrays) */
void ah_json_close_array(ah_buf_t *b);                  /* ] */
void ah_json_open_object(ah_buf_t *b, const char *key); /* "key": {  (key NULL inside arrays) */
/* NULL value → null. Credentials in value are written as "***" (ah_redact_text): every HTTP
 * body and JSON log line is built here. */
void ah_json_str(ah_buf_t *b, const char *key, const char *value);
void ah_json_int(ah_buf_t *b, const char *key, int64_t value);
/* Writes the shortest decimal form that reads back as value (0.1 → 0.1); non-finite → null. */
void ah_json_num(ah_buf_t *b, const char *key, double value);
void ah_json_bool(ah_buf_t *b, const char *key, bool value);
void ah_json_null(ah_buf_t *b, const char *key);
/* Writes s (n bytes) as a JSON string literal with escapes; invalid UTF-8 bytes become U+FFFD. */
void ah_json_escape(ah_buf_t *b, const char *s, size_t n);

#endif
