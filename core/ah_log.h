/* Logging: one line per message on stderr, either the text form "[INFO] message" or,
 * with LOG_FORMAT=json, one JSON object per line. Safe to call from any thread. */
#ifndef AH_LOG_H
#define AH_LOG_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    AH_LOG_DEBUG = 0,
    AH_LOG_INFO,
    AH_LOG_WARN,
    AH_LOG_ERROR,
} ah_log_level_t;

/* Sets the minimum level, the format and the agent id included in JSON lines. Call before
 * other threads log; agent_id is copied. */
void ah_log_setup(ah_log_level_t level, bool json, const char *agent_id);
/* Parses "debug" | "info" | "warn" | "warning" | "error" (case-insensitive). 0 or AH_EINVAL. */
int ah_log_parse_level(const char *s, ah_log_level_t *out);
bool ah_log_enabled(ah_log_level_t level);
/* Logs one message. Text form: "[INFO] msg"; WARN prints as "[WARNING]" (kept compatible with
 * the original distributed-control API). In the text form no message can forge a record: a line
 * break inside it continues on a line indented by 4 spaces (a traceback stays readable, and only
 * records start with "["), and other control characters are written as \r, \x1b, ... The JSON
 * form escapes them as JSON does. */
void ah_log(ah_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Copies text from a client or the store (a reason, a name) into out (size n) for a log message
 * with every control character escaped (\n, \r, \t, \xHH), truncating; returns out. */
const char *ah_log_escape(const char *s, char *out, size_t n);

#define ah_log_debug(...) ah_log(AH_LOG_DEBUG, __VA_ARGS__)
#define ah_log_info(...) ah_log(AH_LOG_INFO, __VA_ARGS__)
#define ah_log_warn(...) ah_log(AH_LOG_WARN, __VA_ARGS__)
#define ah_log_error(...) ah_log(AH_LOG_ERROR, __VA_ARGS__)

#endif
