/* Implementation of ah_log.h: formats each message fully, then writes it with one write(2)
 * under a mutex so lines from different threads never interleave. */
#include "ah_log.h"

#include "ah_common.h"
#include "ah_json.h"
#include "ah_redact.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static ah_log_level_t log_level = AH_LOG_INFO;
static bool log_json = false;
static char log_agent_id[AH_NAME_MAX + 1] = "";
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"DEBUG", "INFO", "WARNING", "ERROR"};

void ah_log_setup(ah_log_level_t level, bool json, const char *agent_id)
{
    pthread_mutex_lock(&log_lock);
    log_level = level;
    log_json = json;
    ah_strlcpy(log_agent_id, agent_id, sizeof(log_agent_id));
    pthread_mutex_unlock(&log_lock);
}

int ah_log_parse_level(const char *s, ah_log_level_t *out)
{
    static const struct {
        const char *name;
        ah_log_level_t level;
    } names[] = {{"debug", AH_LOG_DEBUG},
                 {"info", AH_LOG_INFO},
                 {"warn", AH_LOG_WARN},
                 {"warning", AH_LOG_WARN},
                 {"error", AH_LOG_ERROR}};
    for (size_t i = 0; s != NULL && i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].level;
            return AH_OK;
        }
    }
    return AH_EINVAL;
}

bool ah_log_enabled(ah_log_level_t level)
{
    return level >= log_level;
}

static void write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, p, n);
        if (w <= 0) {
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Appends msg to a text record: a line break continues on an indented line (none after a
 * trailing one), other control characters are escaped. */
static void append_text_safe(ah_buf_t *line, const char *msg)
{
    size_t len = strlen(msg);
    while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == '\r')) {
        len--;
    }
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)msg[i];
        if (c >= 0x20 && c != 0x7f) {
            continue;
        }
        if (c == '\t') {
            continue;
        }
        ah_buf_append(line, msg + start, i - start);
        start = i + 1;
        if (c == '\n') {
            ah_buf_append(line, "\n    ", 5);
        } else if (c == '\r') {
            ah_buf_append(line, "\\r", 2);
        } else {
            ah_buf_printf(line, "\\x%02x", c);
        }
    }
    ah_buf_append(line, msg + start, len - start);
}

const char *ah_log_escape(const char *s, char *out, size_t n)
{
    size_t used = 0;
    if (n == 0) {
        return out;
    }
    for (const unsigned char *p = (const unsigned char *)(s != NULL ? s : ""); *p != '\0'; p++) {
        char esc[5];
        size_t len = 1;
        esc[0] = (char)*p;
        if (*p == '\n' || *p == '\r' || *p == '\t') {
            esc[0] = '\\';
            esc[1] = *p == '\n' ? 'n' : *p == '\r' ? 'r' : 't';
            len = 2;
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof(esc), "\\x%02x", *p);
            len = 4;
        }
        if (used + len >= n) {
            break;
        }
        memcpy(out + used, esc, len);
        used += len;
    }
    out[used] = '\0';
    return out;
}

void ah_log(ah_log_level_t level, const char *fmt, ...)
{
    if (level < log_level || level > AH_LOG_ERROR) {
        return;
    }
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (ah_redact_needed(msg)) {
        char raw[sizeof(msg)];
        memcpy(raw, msg, sizeof(raw));
        ah_redact_text(raw, msg, sizeof(msg));
    }

    ah_buf_t line;
    ah_buf_init(&line);
    pthread_mutex_lock(&log_lock);
    if (log_json) {
        char ts[AH_TIMESTAMP_LEN];
        ah_format_timestamp(ah_now_us(), ts);
        ah_json_open(&line);
        ah_json_str(&line, "ts", ts);
        ah_json_str(&line, "level", level_names[level]);
        ah_json_str(&line, "agent_id", log_agent_id);
        ah_json_str(&line, "msg", msg);
        ah_json_close(&line);
        ah_buf_append(&line, "\n", 1);
    } else {
        ah_buf_printf(&line, "[%s] ", level_names[level]);
        append_text_safe(&line, msg);
        ah_buf_append(&line, "\n", 1);
    }
    if (ah_buf_ok(&line)) {
        write_all(line.data, line.len);
    }
    pthread_mutex_unlock(&log_lock);
    ah_buf_free(&line);
}
