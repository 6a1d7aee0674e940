/* Implementation of the small shared helpers declared in ah_common.h. */
#include "ah_common.h"

#include <math.h>
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

void ah_format_timestamp(int64_t ts_us, char out[AH_TIMESTAMP_LEN])
{
    time_t secs = (time_t)(ts_us / 1000000);
    long micros = (long)(ts_us % 1000000);
    if (micros < 0) {
        micros += 1000000;
        secs -= 1;
    }
    struct tm tm;
    gmtime_r(&secs, &tm);
    char date[24];
    size_t n = strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm);
    date[n] = '\0';
    snprintf(out, AH_TIMESTAMP_LEN, "%.19s.%06ldZ", date, micros);
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

bool ah_utf8_valid(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t extra;
        uint32_t cp;
        if (c == 0) {
            return false;
        } else if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            extra = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            extra = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            extra = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + extra >= n) {
            return false;
        }
        for (size_t k = 1; k <= extra; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        /* reject overlong forms, surrogates and out-of-range code points */
        if ((extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) ||
            (extra == 3 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return false;
        }
        i += extra + 1;
    }
    return true;
}
