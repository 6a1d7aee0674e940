/* Logging: one line per message on stderr, either the text form "[INFO] message" or,
 * with LOG_FORMAT=json, one JSON object per line. Safe to call from any thread. */
#ifndef AH_LOG_H
#define AH_LOG_H

#include <stdbool.h>

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
/* Logs one line. Text form: "[INFO] msg"; WARN prints as "[WARNING]" (kept compatible with the original distributed-control API). */
void ah_log(ah_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define ah_log_debug(...) ah_log(AH_LOG_DEBUG, __VA_ARGS__)
#define ah_log_info(...) ah_log(AH_LOG_INFO, __VA_ARGS__)
#define ah_log_warn(...) ah_log(AH_LOG_WARN, __VA_ARGS__)
#define ah_log_error(...) ah_log(AH_LOG_ERROR, __VA_ARGS__)

#endif
