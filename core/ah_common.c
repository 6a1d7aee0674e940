/* Implementation of the small shared helpers declared in ah_common.h. */
#include "ah_common.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

const char *ah_command_name(ah_command_t cmd)
{
    switch (cmd) {
    case AH_CMD_PAUSE:
        return "pause";
    case AH_CMD_RUNNING:
        return "running";
    case AH_CMD_SHUTDOWN:
        return "shutdown";
    default:
        return "none";
    }
}

int ah_command_parse(const char *name, ah_command_t *out)
{
    if (name == NULL) {
        return AH_EINVAL;
    }
    if (strcmp(name, "pause") == 0) {
        *out = AH_CMD_PAUSE;
    } else if (strcmp(name, "running") == 0 || strcmp(name, "resume") == 0) {
        *out = AH_CMD_RUNNING;
    } else if (strcmp(name, "shutdown") == 0) {
        *out = AH_CMD_SHUTDOWN;
    } else {
        return AH_EINVAL;
    }
    return AH_OK;
}

const char *ah_source_name(ah_source_t src)
{
    switch (src) {
    case AH_SOURCE_CLUSTER:
        return "cluster";
    case AH_SOURCE_LOCAL:
        return "local";
    case AH_SOURCE_SIGNAL:
        return "signal";
    case AH_SOURCE_STARTUP:
        return "startup";
    }
    return "unknown";
}

int64_t ah_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t ah_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t ah_mono_coarse_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void ah_mono_deadline(double seconds, struct timespec *out)
{
    if (!(seconds > 0)) {
        seconds = 0;
    } else if (seconds > 365.0 * 86400.0) {
        seconds = 365.0 * 86400.0;
    }
    clock_gettime(CLOCK_MONOTONIC, out);
    double whole = floor(seconds);
    out->tv_sec += (time_t)whole;
    out->tv_nsec += (long)((seconds - whole) * 1e9);
    if (out->tv_nsec >= 1000000000L) {
        out->tv_sec += 1;
        out->tv_nsec -= 1000000000L;
    }
}

int ah_double_to_int64(double v, int64_t *out)
{
    /* -2^63 is exact as a double; 2^63 is the first value past INT64_MAX. */
    if (v >= -9223372036854775808.0 && v < 9223372036854775808.0) {
        *out = (int64_t)v;
        return AH_OK;
    }
    *out = isnan(v) ? 0 : (v < 0 ? INT64_MIN : INT64_MAX);
    return AH_EINVAL;
}

int64_t ah_int64_mul_sat(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) {
        return (a < 0) != (b < 0) ? INT64_MIN : INT64_MAX;
    }
    return r;
}

int64_t ah_int64_add_sat(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r)) {
        return b < 0 ? INT64_MIN : INT64_MAX;
    }
    return r;
}

int64_t ah_int64_sub_sat(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_sub_overflow(a, b, &r)) {
        return b > 0 ? INT64_MIN : INT64_MAX;
    }
    return r;
}

void ah_format_timestamp(int64_t ts_us, char out[AH_TIMESTAMP_LEN])
{
    if (ts_us < AH_TIMESTAMP_MIN_US) {
        ts_us = AH_TIMESTAMP_MIN_US;
    } else if (ts_us > AH_TIMESTAMP_MAX_US) {
        ts_us = AH_TIMESTAMP_MAX_US;
    }
    time_t secs = (time_t)(ts_us / 1000000);
    long micros = (long)(ts_us % 1000000);
    if (micros < 0) {
        micros += 1000000;
        secs -= 1;
    }
    struct tm tm;
    gmtime_r(&secs, &tm); /* cannot fail for years 0-9999 */
    /* Not strftime: glibc's %Y does not pad the years before 1000 to four digits. The fields
     * are in range, so the text fits AH_TIMESTAMP_LEN; the larger buffer is for the compiler. */
    char text[128];
    snprintf(text, sizeof(text), "%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, micros);
    ah_strlcpy(out, text, AH_TIMESTAMP_LEN);
}

void ah_strlcpy(char *dst, const char *src, size_t n)
{
    if (n == 0) {
        return;
    }
    if (src == NULL) {
        dst[0] = '\0';
        return;
    }
    size_t len = strnlen(src, n - 1);
    memcpy(dst, src, len);
    dst[len] = '\0';
}

size_t ah_utf8_seq_len(const unsigned char *s, size_t n)
{
    size_t len;
    if (s[0] < 0x80) {
        return 1;
    } else if ((s[0] & 0xE0) == 0xC0 && s[0] >= 0xC2) {
        len = 2;
    } else if ((s[0] & 0xF0) == 0xE0) {
        len = 3;
    } else if ((s[0] & 0xF8) == 0xF0 && s[0] <= 0xF4) {
        len = 4;
    } else {
        return 0;
    }
    if (len > n) {
        return 0;
    }
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            return 0;
        }
    }
    /* overlong forms and surrogates (3 bytes), overlong forms and past U+10FFFF (4 bytes) */
    if (len == 3 && ((s[0] == 0xE0 && s[1] < 0xA0) || (s[0] == 0xED && s[1] >= 0xA0))) {
        return 0;
    }
    if (len == 4 && ((s[0] == 0xF0 && s[1] < 0x90) || (s[0] == 0xF4 && s[1] >= 0x90))) {
        return 0;
    }
    return len;
}

bool ah_utf8_valid(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        size_t len = s[i] == 0 ? 0 : ah_utf8_seq_len(s + i, n - i);
        if (len == 0) {
            return false;
        }
        i += len;
    }
    return true;
}

bool ah_cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *lock, double seconds,
                        bool (*done)(void *arg), void *arg)
{
    struct timespec deadline;
    ah_mono_deadline(seconds, &deadline);
    while (!done(arg)) {
        if (pthread_cond_timedwait(cond, lock, &deadline) == ETIMEDOUT) {
            return done(arg);
        }
    }
    return true;
}

static bool flag_is_set(void *flag)
{
    return *(const bool *)flag;
}

bool ah_cond_wait_flag(pthread_cond_t *cond, pthread_mutex_t *lock, const bool *flag,
                       double seconds)
{
    pthread_mutex_lock(lock);
    bool set = ah_cond_wait_until(cond, lock, seconds, flag_is_set, (void *)flag);
    pthread_mutex_unlock(lock);
    return set;
}

void ah_sleep(double seconds)
{
    if (!(seconds > 0)) {
        return;
    }
    if (seconds > 365.0 * 86400.0) { /* as ah_mono_deadline; keeps the cast defined */
        seconds = 365.0 * 86400.0;
    }
    struct timespec req;
    req.tv_sec = (time_t)seconds;
    req.tv_nsec = (long)((seconds - (double)req.tv_sec) * 1e9);
    if (req.tv_nsec >= 1000000000L) {
        req.tv_nsec = 999999999L;
    }
    struct timespec rem;
    while (nanosleep(&req, &rem) != 0 && errno == EINTR) {
        req = rem;
    }
}

/* word lower-cased without '_' and '-' into out (size n); false when it does not fit. */
static bool normalize_name(const char *word, char *out, size_t n)
{
    size_t used = 0;
    for (const char *p = word; *p != '\0'; p++) {
        if (*p == '_' || *p == '-') {
            continue;
        }
        if (used + 1 >= n) {
            return false;
        }
        out[used++] = (char)tolower((unsigned char)*p);
    }
    out[used] = '\0';
    return true;
}

/* Edit distance between two names of at most 32 bytes: insertions, deletions, substitutions and
 * transpositions of neighbours ("wiat" → "wait") cost 1 (optimal string alignment). */
static size_t name_distance(const char *a, const char *b)
{
    size_t la = strlen(a);
    size_t lb = strlen(b);
    size_t d[33][33];
    for (size_t i = 0; i <= la; i++) {
        d[i][0] = i;
    }
    for (size_t j = 0; j <= lb; j++) {
        d[0][j] = j;
    }
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            size_t best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (d[i - 1][j] + 1 < best) {
                best = d[i - 1][j] + 1;
            }
            if (d[i][j - 1] + 1 < best) {
                best = d[i][j - 1] + 1;
            }
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best) {
                best = d[i - 2][j - 2] + 1;
            }
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

const char *ah_suggest(const char *word, const char *const *candidates, bool *exact)
{
    char w[33], c[33];
    if (exact != NULL) {
        *exact = false;
    }
    if (word == NULL || !normalize_name(word, w, sizeof(w)) || w[0] == '\0') {
        return NULL;
    }
    const char *best = NULL;
    size_t len = strlen(w);
    size_t best_distance = len <= 4 ? 2 : len <= 5 ? 3 : 4; /* accepted: below this */
    for (const char *const *p = candidates; *p != NULL; p++) {
        if (!normalize_name(*p, c, sizeof(c))) {
            continue;
        }
        size_t d = name_distance(w, c);
        if (d == 0) {
            if (exact != NULL) {
                *exact = true;
            }
            return *p;
        }
        if (d < best_distance) {
            best_distance = d;
            best = *p;
        }
    }
    return best;
}

int ah_parse_duration(const char *text, double *out)
{
    if (text == NULL || strlen(text) > 32 || !(text[0] >= '0' && text[0] <= '9')) {
        return AH_EINVAL;
    }
    size_t digits = strspn(text, "0123456789."); /* a second '.' stops strtod: refused below */
    char number[40];
    memcpy(number, text, digits);
    number[digits] = '\0';
    const char *unit = text + digits;
    double scale;
    if (unit[0] == '\0' || strcmp(unit, "s") == 0) {
        scale = 1;
    } else if (strcmp(unit, "ms") == 0) {
        scale = 0.001;
    } else if (strcmp(unit, "m") == 0) {
        scale = 60;
    } else if (strcmp(unit, "h") == 0) {
        scale = 3600;
    } else {
        return AH_EINVAL;
    }
    char *end = NULL;
    double value = strtod(number, &end);
    if (end != number + digits || !isfinite(value * scale)) {
        return AH_EINVAL;
    }
    *out = value * scale;
    return AH_OK;
}

double ah_backoff(int failures, double min, double max)
{
    double delay = min;
    for (int i = 0; i < failures && delay < max; i++) {
        delay *= 2;
    }
    return delay > max ? max : delay;
}

double ah_jitter(unsigned int *seed, double lo, double hi)
{
    return lo + (hi - lo) * ((double)rand_r(seed) / ((double)RAND_MAX + 1.0));
}
